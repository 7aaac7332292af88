/* tests/test_native_arm.py's driver: native.c built for another CPU (aarch64 under qemu-user).
   `driver linear IN OUT`: one er_linear; `driver step IN OUT`: a model and a list of er_step calls.
   IN's layout is test_native_arm's (_lin_blob, _linear_blob, _model_blob); OUT gets the float results
   (the linear's rows; each step's logits rows). */
#include "native.c"

#include "driver_io.h"
static void wr(FILE *out, const float *p, size_t n) { if (fwrite(p, sizeof(float), n, out) != n) exit(5); }

/* int32 kind, n, k, tiles, w bytes, s floats, has_bias; then w, s, bias (n floats) */
static er_lin rd_lin(void) {
    er_lin L;
    L.kind = rd_i(); L.n = rd_i(); L.k = rd_i(); L.tiles = rd_i();
    const int32_t wb = rd_i(), sn = rd_i(), has_bias = rd_i();
    L.w = rd((size_t)wb);
    L.s = rd(sizeof(float) * (size_t)sn);
    L.bias = has_bias ? rd(sizeof(float) * (size_t)L.n) : NULL;
    return L;
}

/* a linear, then int32 M, threads; x (M x k floats) */
static int run_linear(FILE *out) {
    er_lin L = rd_lin();
    const int32_t M = rd_i(), threads = rd_i();
    const float *x = rd(sizeof(float) * (size_t)M * L.k);
    float *y = malloc(sizeof(float) * (size_t)M * L.n);
    if (!y || er_linear(&L, M, x, y, threads) != 0) return 4;
    wr(out, y, (size_t)M * L.n);
    return 0;
}

/* the model's ints and floats, the KV pool's bytes, norm, cos, sin, head, each layer (ln1, ln2, qkv, o,
   gu, down); then int32 steps and each step's T, R, mb, x, positions, slots, qstart, tables, logits rows */
static int run_steps(FILE *out) {
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
    if (!layers) return 4;
    for (int i = 0; i < M.n_layers; i++) {
        layers[i].ln1 = rd(sizeof(float) * (size_t)M.hidden);
        layers[i].ln2 = rd(sizeof(float) * (size_t)M.hidden);
        layers[i].qkv = rd_lin(); layers[i].o = rd_lin(); layers[i].gu = rd_lin(); layers[i].down = rd_lin();
    }
    M.layers = layers;
    M.kv = calloc(1, (size_t)kv_bytes); /* a fresh pool: zeros, as the backend's */
    if (!M.kv) return 4;
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
        wr(out, logits, (size_t)R * M.vocab);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4 || !(in = fopen(argv[2], "rb"))) return 2;
    FILE *out = fopen(argv[3], "wb");
    if (!out) return 2;
    const int rc = !strcmp(argv[1], "linear") ? run_linear(out) : !strcmp(argv[1], "step") ? run_steps(out) : 2;
    return fclose(out) ? 5 : rc;
}
