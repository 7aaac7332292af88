/*
 * ask.c - answer a question over an ingested collection through libedgerag.so, streaming the
 * answer, then its numbered sources (what `edge-rag ask` prints).
 *
 *   make capi
 *   cc -std=c11 -Iinclude examples/c/ask.c -Lbuild -ledgerag -Wl,-rpath,$PWD/build -o build/ask
 *   build/ask "What does error E-214 mean?"
 *   build/ask --engine engines/gen --collection manuals -k 5 --max-tokens 128 "How do I calibrate the lidar?"
 *
 * Exit status: 0 answered, 1 an edge-rag error (printed as one line), 2 bad usage.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_rag.h"

static int print_token(const char *piece, size_t len, void *user) {
    (void)user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* non-zero would cancel */
}

static int usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--engine DIR] [--embedder DIR] [--collection NAME] [--backend B] [--threads N]\n"
            "          [-k N] [--max-tokens N] QUESTION\n",
            argv0);
    return 2;
}

int main(int argc, char **argv) {
    er_options opt = ER_OPTIONS_INIT;
    er_ask_params params = ER_ASK_PARAMS_INIT;
    const char *question = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--engine") == 0 && v) opt.generator_bundle = argv[++i];
        else if (strcmp(a, "--embedder") == 0 && v) opt.embedder_bundle = argv[++i];
        else if ((strcmp(a, "--collection") == 0 || strcmp(a, "-c") == 0) && v) opt.collection = argv[++i];
        else if (strcmp(a, "--backend") == 0 && v) opt.backend = argv[++i];
        else if (strcmp(a, "--threads") == 0 && v) opt.threads = atoi(argv[++i]);
        else if (strcmp(a, "-k") == 0 && v) params.k = atoi(argv[++i]);
        else if (strcmp(a, "--max-tokens") == 0 && v) params.max_tokens = atoi(argv[++i]);
        else if (a[0] == '-' && a[1] != '\0') return usage(argv[0]);
        else if (question == NULL) question = a;
        else return usage(argv[0]);
    }
    if (question == NULL) return usage(argv[0]);

    er_runtime *rt = NULL;
    er_status st = er_open(&opt, &rt);
    if (st != ER_OK) {
        fprintf(stderr, "error: %s: %s\n", er_status_name(st), er_last_error());
        return 1;
    }
    er_answer *ans = NULL;
    st = er_ask(rt, question, &params, print_token, NULL, &ans);
    if (st != ER_OK) {
        fprintf(stderr, "\nerror: %s: %s\n", er_status_name(st), er_last_error());
        er_close(rt);
        return 1;
    }
    printf("\n");
    if (ans->n_sources > 0) {
        int any_cited = 0;
        printf("\nSources:\n");
        for (size_t i = 0; i < ans->n_sources; i++) {
            const er_passage *s = &ans->sources[i];
            printf("  [%d]%s %s, %s%s%s\n", s->n, s->cited ? " *" : "", s->source, s->location,
                   s->heading[0] ? " \xe2\x80\x94 " : "", s->heading);
            any_cited |= s->cited;
        }
        if (any_cited) printf("  (* cited in the answer)\n");
    }
    fprintf(stderr, "first token %.0f ms, total %.0f ms, %d prompt tokens, %d answer tokens\n", ans->ttft_ms,
            ans->total_ms, ans->n_prompt_tokens, ans->n_answer_tokens);
    er_answer_free(ans);
    er_close(rt);
    return 0;
}
