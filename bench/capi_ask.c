/*
 * bench/capi_ask.c - the C side of bench/bench_capi.py: open a runtime through libedgerag.so, warm
 * up, then ask each question of a file (one per line) and print one JSON line per answer with the
 * time to the first token callback and to the return of er_ask, measured here in C.
 *
 *   capi_ask ENGINE COLLECTION THREADS MAX_TOKENS QUESTIONS_FILE WARMUP
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edge_rag.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

typedef struct timing {
    double first;
} timing;

static int on_token(const char *piece, size_t len, void *user) {
    (void)piece, (void)len;
    timing *t = (timing *)user;
    if (t->first == 0) t->first = now_ms();
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: capi_ask ENGINE COLLECTION THREADS MAX_TOKENS QUESTIONS_FILE WARMUP\n");
        return 2;
    }
    er_options opt = ER_OPTIONS_INIT;
    opt.generator_bundle = argv[1];
    opt.collection = argv[2];
    opt.threads = atoi(argv[3]);
    opt.load_generator = 1;
    er_ask_params params = ER_ASK_PARAMS_INIT;
    params.max_tokens = atoi(argv[4]);
    int warmup = atoi(argv[6]);
    FILE *f = fopen(argv[5], "r");
    if (f == NULL) {
        perror(argv[5]);
        return 2;
    }
    char *questions[256];
    int n = 0;
    char line[4096];
    while (n < 256 && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0]) questions[n++] = strdup(line);
    }
    fclose(f);

    er_runtime *rt = NULL;
    if (er_open(&opt, &rt) != ER_OK) {
        fprintf(stderr, "error: %s\n", er_last_error());
        return 1;
    }
    for (int i = 0; i < warmup + n; i++) {
        const char *q = questions[i < warmup ? 0 : i - warmup];
        timing t = {0};
        er_answer *a = NULL;
        double t0 = now_ms();
        er_status st = er_ask(rt, q, &params, on_token, &t, &a);
        double t1 = now_ms();
        if (st != ER_OK) {
            fprintf(stderr, "error: %s\n", er_last_error());
            return 1;
        }
        if (i >= warmup)
            printf("{\"q\": %d, \"ttft_ms\": %.3f, \"total_ms\": %.3f, \"n_answer_tokens\": %d, \"answer\": %s}\n",
                   i - warmup, (t.first ? t.first : t1) - t0, t1 - t0, a->n_answer_tokens, a->json);
        fflush(stdout);
        er_answer_free(a);
    }
    er_close(rt);
    for (int i = 0; i < n; i++) free(questions[i]);
    return 0;
}
