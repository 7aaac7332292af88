"""The C structs and signatures of csrc/native.c (the decode step) and csrc/encoder.c (the sentence
encoder), in ctypes (one place; the C files' typedefs are the other side of this contract)."""

from __future__ import annotations

import ctypes as C

ISA_NAMES = ("scalar", "avx2", "avx512", "vnni")  # er_set_isa's codes 0, 1, 2, 3 (avx512: AVX-512BW without VNNI)


class Lin(C.Structure):
    _fields_ = [("kind", C.c_int32), ("n", C.c_int32), ("k", C.c_int32), ("tiles", C.c_int32),
                ("w", C.c_void_p), ("s", C.c_void_p), ("bias", C.c_void_p)]


class Layer(C.Structure):
    _fields_ = [("ln1", C.c_void_p), ("ln2", C.c_void_p), ("qkv", Lin), ("o", Lin), ("gu", Lin), ("down", Lin)]


class Model(C.Structure):
    _fields_ = [("n_layers", C.c_int32), ("hidden", C.c_int32), ("n_heads", C.c_int32), ("n_kv", C.c_int32),
                ("head_dim", C.c_int32), ("inter", C.c_int32), ("vocab", C.c_int32), ("block_size", C.c_int32),
                ("num_blocks", C.c_int32), ("max_ctx", C.c_int32), ("threads", C.c_int32),
                ("eps", C.c_float), ("attn_scale", C.c_float), ("layers", C.POINTER(Layer)), ("norm", C.c_void_p),
                ("head", Lin), ("cos", C.c_void_p), ("sin", C.c_void_p), ("kv", C.c_void_p),
                ("kv_int8", C.c_int32)]


def declare(lib: C.CDLL) -> None:
    P = C.c_void_p
    lib.er_isa_max.restype = C.c_int
    lib.er_isa_max.argtypes = []
    lib.er_ymm_vnni.restype = C.c_int
    lib.er_ymm_vnni.argtypes = []
    lib.er_set_isa.restype = C.c_int
    lib.er_set_isa.argtypes = [C.c_int]
    lib.er_linear.restype = C.c_int
    lib.er_linear.argtypes = [C.POINTER(Lin), C.c_int, P, P, C.c_int]
    lib.er_work_bytes.restype = C.c_size_t
    lib.er_work_bytes.argtypes = [C.POINTER(Model), C.c_int]
    lib.er_profile.restype = C.c_int  # phase times of -DER_PROFILE builds (development); 0 phases otherwise
    lib.er_profile.argtypes = [P, C.c_int]
    lib.er_step.restype = C.c_int
    lib.er_step.argtypes = [C.POINTER(Model), C.c_int, C.c_int, P, P, P, P, P, C.c_int, P, P, P]


# ---- csrc/encoder.c ----------------------------------------------------------------------------

class EncLin(C.Structure):
    _fields_ = [("n", C.c_int32), ("k", C.c_int32), ("w", C.c_void_p), ("corr", C.c_void_p),
                ("mult", C.c_void_p), ("bias", C.c_void_p), ("smooth", C.c_void_p)]


class EncLayer(C.Structure):
    _fields_ = [("qkv", EncLin), ("o", EncLin), ("up", EncLin), ("down", EncLin),
                ("ln1_w", C.c_void_p), ("ln1_b", C.c_void_p), ("ln2_w", C.c_void_p), ("ln2_b", C.c_void_p)]


class Enc(C.Structure):
    _fields_ = [("n_layers", C.c_int32), ("hidden", C.c_int32), ("n_heads", C.c_int32), ("head_dim", C.c_int32),
                ("inter", C.c_int32), ("vocab", C.c_int32), ("max_pos", C.c_int32), ("portable", C.c_int32),
                ("ln_eps", C.c_float), ("emb_ln_eps", C.c_float), ("qscale", C.c_float), ("qeps", C.c_float),
                ("norm_eps", C.c_float),
                ("word", C.c_void_p), ("pos", C.c_void_p), ("emb_ln_w", C.c_void_p), ("emb_ln_b", C.c_void_p),
                ("layers", C.POINTER(EncLayer))]


def declare_encoder(lib: C.CDLL) -> None:
    P = C.c_void_p
    lib.er_enc_isa.restype = C.c_int
    lib.er_enc_isa.argtypes = []
    lib.er_encode_work_bytes.restype = C.c_size_t
    lib.er_encode_work_bytes.argtypes = [C.POINTER(Enc), C.c_int, C.c_int]
    lib.er_encode.restype = C.c_int
    lib.er_encode.argtypes = [C.POINTER(Enc), C.c_int, P, P, P, P]
