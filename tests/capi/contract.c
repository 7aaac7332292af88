/*
 * The C API's contract, driven by tests/test_capi.py (built with and without AddressSanitizer).
 *
 *   contract errors  ENGINE COLLECTION             every misuse returns its status and a message
 *   contract threads ENGINE COLLECTION OUTDIR Q1 Q2 two threads ask at once; answers to OUTDIR/answer-<i>.json
 *   contract api     ENGINE COLLECTION OUTDIR      search, embed, generate, chat, cancel
 *
 * Prints one line per check ("ok <what>" or "FAIL <what>: ..."); exits 1 when any check failed.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edge_rag.h"

static int failures = 0;

static void expect(const char *what, er_status got, er_status want) {
    const char *msg = er_last_error();
    if (got != want) {
        printf("FAIL %s: got %s, want %s (%s)\n", what, er_status_name(got), er_status_name(want), msg);
        failures++;
    } else if (want != ER_OK && (msg == NULL || msg[0] == '\0')) {
        printf("FAIL %s: %s without a message\n", what, er_status_name(got));
        failures++;
    } else {
        printf("ok %s: %s %s\n", what, er_status_name(got), msg);
    }
}

static void check(const char *what, int cond) {
    printf("%s %s\n", cond ? "ok" : "FAIL", what);
    if (!cond) failures++;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cancel_at_once(const char *piece, size_t len, void *user) {
    (void)piece, (void)len, (void)user;
    return 1;
}

/* ---- errors ---------------------------------------------------------------------------- */

static int run_errors(const char *engine, const char *collection) {
    er_runtime *rt = NULL;
    er_answer *ans = NULL;
    er_hits *hits = NULL;
    er_text *text = NULL;
    expect("open with out NULL", er_open(NULL, NULL), ER_INVALID_ARGUMENT);
    expect("ask with rt NULL", er_ask(NULL, "q", NULL, NULL, NULL, &ans), ER_INVALID_ARGUMENT);
    check("ask with rt NULL leaves *out NULL", ans == NULL);
    expect("ask with out NULL", er_ask(NULL, "q", NULL, NULL, NULL, NULL), ER_INVALID_ARGUMENT);
    expect("search with rt NULL", er_search(NULL, "q", 5, NULL, &hits), ER_INVALID_ARGUMENT);
    expect("generate with rt NULL", er_generate(NULL, "p", NULL, NULL, NULL, &text), ER_INVALID_ARGUMENT);
    expect("cancel with rt NULL", er_cancel(NULL, 1), ER_INVALID_ARGUMENT);
    er_close(NULL);
    er_answer_free(NULL);
    er_hits_free(NULL);
    er_text_free(NULL);

    er_options missing = ER_OPTIONS_INIT;
    missing.generator_bundle = "/nonexistent/bundle";
    missing.collection = collection;
    expect("open a missing bundle", er_open(&missing, &rt), ER_NOT_FOUND);
    check("a failed open leaves *out NULL", rt == NULL);

    er_options unknown = ER_OPTIONS_INIT;
    unknown.generator_bundle = engine;
    unknown.collection = "no-such-collection";
    expect("open an unknown collection", er_open(&unknown, &rt), ER_NO_COLLECTION);
    check("the message names the collection", strstr(er_last_error(), "no-such-collection") != NULL);

    er_options bad_threads = ER_OPTIONS_INIT;
    bad_threads.generator_bundle = engine;
    bad_threads.collection = collection;
    bad_threads.threads = -3;
    expect("open with threads -3", er_open(&bad_threads, &rt), ER_INVALID_ARGUMENT);

    er_options good = ER_OPTIONS_INIT;
    good.generator_bundle = engine;
    good.collection = collection;
    good.threads = 1;
    expect("open", er_open(&good, &rt), ER_OK);
    if (rt == NULL) return 1;
    expect("ask a NULL question", er_ask(rt, NULL, NULL, NULL, NULL, &ans), ER_INVALID_ARGUMENT);
    expect("ask an empty question", er_ask(rt, "   ", NULL, NULL, NULL, &ans), ER_INVALID_ARGUMENT);
    er_ask_params bad_mode = ER_ASK_PARAMS_INIT;
    bad_mode.mode = "telepathy";
    expect("ask with mode telepathy", er_ask(rt, "What does E-214 mean?", &bad_mode, NULL, NULL, &ans),
           ER_INVALID_ARGUMENT);
    er_ask_params neg = ER_ASK_PARAMS_INIT;
    neg.k = -1;
    expect("ask with k -1", er_ask(rt, "What does E-214 mean?", &neg, NULL, NULL, &ans), ER_INVALID_ARGUMENT);
    expect("a callback that cancels", er_ask(rt, "What does error E-214 mean?", NULL, cancel_at_once, NULL, &ans),
           ER_CANCELLED);
    check("a cancelled ask leaves *out NULL", ans == NULL);
    expect("cancel an id not in flight", er_cancel(rt, 42), ER_NOT_FOUND);
    expect("cancel id 0", er_cancel(rt, 0), ER_INVALID_ARGUMENT);
    float small[4];
    const char *texts[] = {"one", "two"};
    expect("embed into too small a buffer", er_embed(rt, texts, 2, small, 4), ER_INVALID_ARGUMENT);
    const char *with_null[] = {"one", NULL};
    expect("embed a NULL text", er_embed(rt, with_null, 2, small, 4), ER_INVALID_ARGUMENT);
    er_message msgs[] = {{"robot", "hi"}};
    expect("chat with role robot", er_chat(rt, msgs, 1, NULL, NULL, NULL, &text), ER_INVALID_ARGUMENT);
    er_message null_msg[] = {{"user", NULL}};
    expect("chat with a NULL content", er_chat(rt, null_msg, 1, NULL, NULL, NULL, &text), ER_INVALID_ARGUMENT);
    er_sampling bad_temp = ER_SAMPLING_INIT;
    bad_temp.temperature = -1.0f;
    expect("generate at temperature -1", er_generate(rt, "hello", &bad_temp, NULL, NULL, &text), ER_INVALID_ARGUMENT);
    check("the message names temperature", strstr(er_last_error(), "temperature") != NULL);
    /* after every error the runtime still answers */
    expect("ask after the errors", er_ask(rt, "What does error E-214 mean?", NULL, NULL, NULL, &ans), ER_OK);
    check("the answer has sources", ans != NULL && ans->n_sources > 0);
    check("a success clears the message", er_last_error()[0] == '\0');
    er_answer_free(ans);
    er_close(rt);
    return failures ? 1 : 0;
}

/* ---- two threads at once --------------------------------------------------------------- */

typedef struct asker {
    er_runtime *rt;
    const char *question;
    pthread_barrier_t *start;
    char *streamed;
    size_t len, cap;
    er_status status;
    er_answer *answer;
    double t0, t_first, t1;
} asker;

static int collect(const char *piece, size_t len, void *user) {
    asker *a = (asker *)user;
    if (a->t_first == 0) a->t_first = now_ms();
    if (a->len + len + 1 > a->cap) {
        a->cap = 2 * (a->len + len + 1);
        a->streamed = (char *)realloc(a->streamed, a->cap);
    }
    memcpy(a->streamed + a->len, piece, len);
    a->len += len;
    a->streamed[a->len] = '\0';
    return 0;
}

static void *ask_thread(void *p) {
    asker *a = (asker *)p;
    pthread_barrier_wait(a->start);
    a->t0 = now_ms();
    er_ask_params params = ER_ASK_PARAMS_INIT;
    params.max_tokens = 24;
    a->status = er_ask(a->rt, a->question, &params, collect, a, &a->answer);
    a->t1 = now_ms();
    return NULL;
}

static int write_file(const char *dir, const char *name, const char *text, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL) return 1;
    if (text) fwrite(text, 1, len, f); /* pieces may hold NUL bytes (len counts them) */
    fclose(f);
    return 0;
}

static int run_threads(const char *engine, const char *collection, const char *outdir, const char *q1, const char *q2) {
    er_options opt = ER_OPTIONS_INIT;
    opt.generator_bundle = engine;
    opt.collection = collection;
    opt.threads = 1;
    opt.load_generator = 1;
    er_runtime *rt = NULL;
    expect("open", er_open(&opt, &rt), ER_OK);
    if (rt == NULL) return 1;
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, 2);
    asker a[2] = {{rt, q1, &start, NULL, 0, 0, ER_OK, NULL, 0, 0, 0}, {rt, q2, &start, NULL, 0, 0, ER_OK, NULL, 0, 0, 0}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, ask_thread, &a[i]);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&start);
    for (int i = 0; i < 2; i++) {
        char what[64], name[64];
        snprintf(what, sizeof what, "thread %d asks", i);
        expect(what, a[i].status, ER_OK);
        if (a[i].answer == NULL) continue;
        snprintf(what, sizeof what, "thread %d's answer is its own question's", i);
        check(what, strcmp(a[i].answer->question, a[i].question) == 0);
        snprintf(name, sizeof name, "answer-%d.json", i);
        write_file(outdir, name, a[i].answer->json, strlen(a[i].answer->json));
        snprintf(name, sizeof name, "streamed-%d.txt", i);
        write_file(outdir, name, a[i].streamed, a[i].len);
    }
    /* both calls were in flight together: each started before the other returned */
    check("the two calls overlapped", a[0].t0 < a[1].t1 && a[1].t0 < a[0].t1);
    printf("timing thread 0 %.0f..%.0f ms, thread 1 %.0f..%.0f ms\n", 0.0, a[0].t1 - a[0].t0, a[1].t0 - a[0].t0,
           a[1].t1 - a[0].t0);
    for (int i = 0; i < 2; i++) {
        er_answer_free(a[i].answer);
        free(a[i].streamed);
    }
    er_close(rt);
    return failures ? 1 : 0;
}

/* ---- the rest of the API ----------------------------------------------------------------- */

typedef struct canceller {
    er_runtime *rt;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int tokens;
} canceller;

static int count_and_signal(const char *piece, size_t len, void *user) {
    (void)piece, (void)len;
    canceller *c = (canceller *)user;
    pthread_mutex_lock(&c->mu);
    c->tokens++;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static void *cancel_thread(void *p) {
    canceller *c = (canceller *)p;
    pthread_mutex_lock(&c->mu);
    while (c->tokens == 0) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    expect("er_cancel from another thread", er_cancel(c->rt, 77), ER_OK);
    return NULL;
}

static int run_api(const char *engine, const char *collection, const char *outdir) {
    er_options opt = ER_OPTIONS_INIT;
    opt.generator_bundle = engine;
    opt.collection = collection;
    opt.threads = 1;
    er_runtime *rt = NULL;
    expect("open", er_open(&opt, &rt), ER_OK);
    if (rt == NULL) return 1;
    check("version", strlen(er_version()) > 0 && er_api_version() == ER_API_VERSION);

    er_hits *hits = NULL;
    expect("search", er_search(rt, "E-214 coolant", 3, "keyword", &hits), ER_OK);
    check("search finds the E-214 passage", hits && hits->n >= 1 && strstr(hits->hits[0].text, "E-214") != NULL);
    check("search passages carry a source and a location",
          hits && hits->n >= 1 && strstr(hits->hits[0].source, ".md") && strstr(hits->hits[0].location, "line"));
    er_hits_free(hits);

    size_t dim = 0;
    expect("embedding dim", er_embedding_dim(rt, &dim), ER_OK);
    check("dim > 0", dim > 0);
    const char *texts[] = {"coolant pressure", "touch screen"};
    float *vecs = (float *)calloc(2 * dim, sizeof(float));
    expect("embed", er_embed(rt, texts, 2, vecs, 2 * dim), ER_OK);
    {
        char path[4096];
        snprintf(path, sizeof path, "%s/embeddings.f32", outdir);
        FILE *g = fopen(path, "wb");
        if (g) {
            fwrite(vecs, sizeof(float), 2 * dim, g);
            fclose(g);
        }
    }
    free(vecs);

    er_sampling sp = ER_SAMPLING_INIT;
    sp.max_tokens = 8;
    er_text *text = NULL;
    expect("generate", er_generate(rt, "The robot", &sp, NULL, NULL, &text), ER_OK);
    check("generate stops at max_tokens or eos", text && text->n_tokens <= 8 && text->n_prompt_tokens > 0);
    if (text) write_file(outdir, "generate.txt", text->text, text->text_len);
    er_text_free(text);
    er_message msgs[] = {{"system", "You are terse."}, {"user", "Say something."}};
    expect("chat", er_chat(rt, msgs, 2, &sp, NULL, NULL, &text), ER_OK);
    if (text) write_file(outdir, "chat.txt", text->text, text->text_len);
    er_text_free(text);

    /* er_cancel from another thread once the first token has streamed */
    canceller c = {rt, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    pthread_t th;
    pthread_create(&th, NULL, cancel_thread, &c);
    er_sampling long_run = ER_SAMPLING_INIT;
    long_run.max_tokens = 2000;
    long_run.temperature = 0.0f; /* greedy: the same tokens every run */
    long_run.request_id = 77;
    expect("a generation cancelled by er_cancel", er_generate(rt, "The robot", &long_run, count_and_signal, &c, &text),
           ER_CANCELLED);
    pthread_join(th, NULL);
    check("it stopped early", c.tokens < 200);
    expect("the id is free again", er_cancel(rt, 77), ER_NOT_FOUND);
    er_close(rt);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "errors") == 0) return run_errors(argv[2], argv[3]);
    if (argc >= 7 && strcmp(argv[1], "threads") == 0) return run_threads(argv[2], argv[3], argv[4], argv[5], argv[6]);
    if (argc >= 5 && strcmp(argv[1], "api") == 0) return run_api(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: contract errors|threads|api ENGINE COLLECTION [OUTDIR Q1 Q2]\n");
    return 2;
}
