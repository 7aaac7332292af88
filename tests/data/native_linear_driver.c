/* tests/test_native_arm.py's driver: one er_linear of native.c, built for another CPU (aarch64 under
   qemu-user). Reads a linear and its input rows from argv[1], writes the float output rows to argv[2].
   File: int32 kind, n, k, tiles, M, has_bias, w bytes, s floats, threads; then w, s, bias (n floats
   when has_bias), x (M x k floats). */
#include "native.c"

#include <stdio.h>

static void *read_n(FILE *f, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p || fread(p, 1, bytes, f) != bytes) exit(3);
    return p;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    int32_t h[9];
    if (fread(h, sizeof h, 1, f) != 1) return 3;
    er_lin L = {h[0], h[1], h[2], h[3], NULL, NULL, NULL};
    const int M = h[4];
    L.w = read_n(f, (size_t)h[6]);
    L.s = read_n(f, sizeof(float) * (size_t)h[7]);
    if (h[5]) L.bias = read_n(f, sizeof(float) * (size_t)L.n);
    const float *x = read_n(f, sizeof(float) * (size_t)M * L.k);
    fclose(f);
    float *out = malloc(sizeof(float) * (size_t)M * L.n);
    if (!out || er_linear(&L, M, x, out, h[8]) != 0) return 4;
    FILE *o = fopen(argv[2], "wb");
    if (!o || fwrite(out, sizeof(float), (size_t)M * L.n, o) != (size_t)M * L.n) return 5;
    return fclose(o) ? 5 : 0;
}
