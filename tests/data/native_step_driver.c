/* tests/test_native_arm.py's whole-step driver: er_step of native.c on a model and a list of steps read
   from argv[1] (layout: test_native_arm._model_blob), built for another CPU (aarch64 under qemu-user);
   writes each step's logits rows (float) to argv[2]. */
#include "native.c"

#include <stdio.h>

static FILE *in;
static void *rd(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p || (bytes && fread(p, 1, bytes, in) != bytes)) exit(3);
    return p;
}
static int32_t rd_i(void) { int32_t v; if (fread(&v, 4, 1, in) != 1) exit(3); return v; }
static float rd_f(void) { float v; if (fread(&v, 4, 1, in) != 1) exit(3); return v; }

static er_lin rd_lin(void) {
    er_lin L;
    L.kind = rd_i(); L.n = rd_i(); L.k = rd_i(); L.tiles = rd_i();
    const int32_t wb = rd_i(), sn = rd_i(), has_bias = rd_i();
    L.w = rd((size_t)wb);
    L.s = rd(sizeof(float) * (size_t)sn);
    L.bias = has_bias ? rd(sizeof(float) * (size_t)L.n) : NULL;
    return L;
}

int main(int argc, char **argv) {
    if (argc != 3 || !(in = fopen(argv[1], "rb"))) return 2;
    er_model M;
    M.n_layers = rd_i(); M.hidden = rd_i(); M.n_heads = rd_i(); M.n_kv = rd_i(); M.head_dim = rd_i();
    M.inter = rd_i(); M.vocab = rd_i(); M.block_size = rd_i(); M.num_blocks = rd_i(); M.max_ctx = rd_i();
    M.threads = rd_i(); M.kv_int8 = rd_i();
    M.eps = rd_f(); M.attn_scale = rd_f();
    const int32_t kv_bytes = rd_i();
    M.norm = rd(sizeof(float) * (size_t)M.hidden);
    M.cos = rd(sizeof(float) * (size_t)M.max_ctx * (M.head_dim / 2));
    M.sin = rd(sizeof(float) * (size_t)M.max_ctx * (M.head_dim / 2));
    M.head = rd_lin();
    er_layer *layers = calloc((size_t)M.n_layers, sizeof(er_layer));
    for (int i = 0; i < M.n_layers; i++) {
        layers[i].ln1 = rd(sizeof(float) * (size_t)M.hidden);
        layers[i].ln2 = rd(sizeof(float) * (size_t)M.hidden);
        layers[i].qkv = rd_lin(); layers[i].o = rd_lin(); layers[i].gu = rd_lin(); layers[i].down = rd_lin();
    }
    M.layers = layers;
    M.kv = calloc(1, (size_t)kv_bytes);  /* a fresh pool: zeros, as the backend's */
    FILE *out = fopen(argv[2], "wb");
    if (!M.kv || !out) return 2;
    const int32_t steps = rd_i();
    for (int s = 0; s < steps; s++) {
        const int32_t T = rd_i(), R = rd_i(), mb = rd_i();
        float *x = rd(sizeof(float) * (size_t)T * M.hidden);
        int32_t *pos = rd(4 * (size_t)T), *slots = rd(4 * (size_t)T), *qstart = rd(4 * (size_t)(R + 1));
        int32_t *tables = rd(4 * (size_t)R * mb), *lrows = rd(4 * (size_t)R);
        float *logits = calloc((size_t)R * M.vocab, sizeof(float));
        void *work = calloc(1, er_work_bytes(&M, T));
        if (!logits || !work) return 4;
        if (er_step(&M, T, R, x, pos, slots, qstart, tables, mb, lrows, logits, work) != 0) return 4;
        if (fwrite(logits, sizeof(float), (size_t)R * M.vocab, out) != (size_t)R * M.vocab) return 5;
    }
    return fclose(out) ? 5 : 0;
}
