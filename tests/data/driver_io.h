/* The test drivers' input reading (native_driver.c, encoder_driver.c): `in` is the input file; a short read
   exits 3. */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>

static FILE *in;
static void *rd(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p || (bytes && fread(p, 1, bytes, in) != bytes)) exit(3);
    return p;
}
static int32_t rd_i(void) { int32_t v; if (fread(&v, 4, 1, in) != 1) exit(3); return v; }
static float rd_f(void) { float v; if (fread(&v, 4, 1, in) != 1) exit(3); return v; }
