/* tests/test_native_arm.py's driver for encoder.c built for another CPU (aarch64 under qemu-user):
   `encoder_driver IN OUT`: one er_encode. IN's layout is test_native_arm's _encoder_blob: the Enc's header, its
   arrays (weights in pack_weight's int8 layout, the one every path but avx2 reads), then the texts; OUT gets
   int32 er_enc_isa() and the [n, hidden] vectors. */
#include "encoder.c"

#include "driver_io.h"
static const float *rd_fs(size_t n) { return rd(sizeof(float) * n); }

/* int32 n, k, has_smooth; then w (n k int8), corr (n int32), mult, bias (n floats), smooth (k floats) */
static EncLin rd_lin(void) {
    EncLin L;
    L.n = rd_i(); L.k = rd_i();
    const int32_t smooth = rd_i();
    L.w = rd((size_t)L.n * L.k);
    L.corr = rd(sizeof(int32_t) * (size_t)L.n);
    L.mult = rd_fs(L.n);
    L.bias = rd_fs(L.n);
    L.smooth = smooth ? rd_fs(L.k) : NULL;
    return L;
}

int main(int argc, char **argv) {
    if (argc != 3 || !(in = fopen(argv[1], "rb"))) return 2;
    Enc m;
    m.n_layers = rd_i(); m.hidden = rd_i(); m.n_heads = rd_i(); m.head_dim = rd_i();
    m.inter = rd_i(); m.vocab = rd_i(); m.max_pos = rd_i(); m.portable = 0;
    m.ln_eps = rd_f(); m.emb_ln_eps = rd_f(); m.qscale = rd_f(); m.qeps = rd_f(); m.norm_eps = rd_f();
    const size_t h = (size_t)m.hidden;
    m.word = rd_fs((size_t)m.vocab * h); m.pos = rd_fs((size_t)m.max_pos * h);
    m.emb_ln_w = rd_fs(h); m.emb_ln_b = rd_fs(h);
    EncLayer *layers = calloc((size_t)m.n_layers, sizeof(EncLayer));
    if (!layers) return 3;
    for (int l = 0; l < m.n_layers; l++) {
        EncLayer *L = &layers[l];
        L->qkv = rd_lin(); L->o = rd_lin(); L->up = rd_lin(); L->down = rd_lin();
        L->ln1_w = rd_fs(h); L->ln1_b = rd_fs(h); L->ln2_w = rd_fs(h); L->ln2_b = rd_fs(h);
    }
    m.layers = layers;
    const int32_t n = rd_i();
    const int32_t *lens = rd(sizeof(int32_t) * (size_t)n);
    int tokens = 0, max_len = 0;
    for (int i = 0; i < n; i++) { tokens += lens[i]; max_len = lens[i] > max_len ? lens[i] : max_len; }
    const int32_t *ids = rd(sizeof(int32_t) * (size_t)tokens);
    float *vec = malloc(sizeof(float) * (size_t)n * h);
    void *work = malloc(er_encode_work_bytes(&m, tokens, max_len));
    if (!vec || !work || er_encode(&m, n, lens, ids, vec, work) != 0) return 4;
    FILE *out = fopen(argv[2], "wb");
    const int32_t isa = er_enc_isa();
    if (!out || fwrite(&isa, 4, 1, out) != 1 || fwrite(vec, sizeof(float), (size_t)n * h, out) != (size_t)n * h) return 5;
    return fclose(out) != 0;
}
