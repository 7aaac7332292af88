/*
 * edge_rag.h - the C ABI of edge-rag (libedgerag.so), for robot middleware and vendor SDKs.
 *
 *     er_runtime *rt;
 *     er_options opt = ER_OPTIONS_INIT;          // default engines and collection
 *     if (er_open(&opt, &rt) != ER_OK) { fprintf(stderr, "%s\n", er_last_error()); return 1; }
 *     er_answer *a;
 *     if (er_ask(rt, "What does error E-214 mean?", NULL, on_token, NULL, &a) == ER_OK) {
 *         printf("%s\n", a->text);
 *         for (size_t i = 0; i < a->n_sources; i++) printf("[%d] %s, %s\n", a->sources[i].n,
 *                                                          a->sources[i].source, a->sources[i].location);
 *         er_answer_free(a);
 *     }
 *     er_close(rt);
 *
 * The runtime is edge-rag's Python library: the shared library embeds CPython (the interpreter
 * `make capi` was built with, or $EDGE_RAG_PYTHON). No Python type appears here; a host that
 * already runs Python (the library was loaded into a Python process) shares its interpreter.
 *
 * Contract:
 * - Every function returns an er_status; ER_OK is 0. On failure er_last_error() gives a one-line
 *   message (with the fix) for the calling thread; it stays valid until that thread's next call.
 * - Null pointers, missing bundles, unknown collections and bad values are errors, never a crash.
 * - Thread-safe: any number of threads may call into one runtime at once. Each call gets its own
 *   answer; calls queue on the engines as the Python runtime schedules them.
 * - Strings are UTF-8 and NUL-terminated. Token callbacks run on the calling thread; a non-zero
 *   return cancels that call (it then returns ER_CANCELLED). er_cancel() cancels from any thread.
 * - Results (er_answer, er_hits, er_text) are owned by the caller and freed with their _free().
 */
#ifndef EDGE_RAG_H
#define EDGE_RAG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ER_API_VERSION 1

typedef enum er_status {
    ER_OK = 0,
    ER_INVALID_ARGUMENT = 1,  /* a null pointer, an empty string or an out-of-range value */
    ER_NOT_FOUND = 2,         /* a missing or invalid engine bundle */
    ER_NO_COLLECTION = 3,     /* the collection was never ingested (or its index is unusable) */
    ER_CONTEXT_LENGTH = 4,    /* the prompt does not fit the engine's context */
    ER_CANCELLED = 5,         /* a token callback returned non-zero, or er_cancel() */
    ER_BACKEND = 6,           /* the backend (onnxruntime, cuda, tensorrt) is unavailable or failed */
    ER_PYTHON = 7,            /* the embedded interpreter could not start or import edge-rag */
    ER_INTERNAL = 8           /* a bug of ours: the message names it */
} er_status;

/* An opaque runtime: the engines and one collection. */
typedef struct er_runtime er_runtime;

typedef struct er_options {
    const char *generator_bundle;  /* NULL: the default engine (built on first use: minutes) */
    const char *embedder_bundle;   /* NULL: the one the collection was built with, else the default */
    const char *collection;        /* NULL: "default" */
    const char *backend;           /* NULL: "auto"; or "onnxruntime", "cuda", "tensorrt" */
    int threads;                   /* CPU threads for onnxruntime; 0: all cores */
    int load_generator;            /* non-zero: load the generator now instead of at the first ask */
    const char *home;              /* NULL: $EDGE_RAG_HOME or ~/.edge-rag (state root); set: sets
                                      EDGE_RAG_HOME for the whole process */
} er_options;

#define ER_OPTIONS_INIT {NULL, NULL, NULL, NULL, 0, 0, NULL}

typedef struct er_ask_params {
    int k;               /* passages retrieved; 0: 5 */
    const char *mode;    /* NULL: "hybrid"; or "vector", "keyword" */
    int max_tokens;      /* 0: 256 */
    uint64_t request_id; /* 0: none; otherwise er_cancel(rt, request_id) stops this call */
} er_ask_params;

#define ER_ASK_PARAMS_INIT {0, NULL, 0, 0}

typedef struct er_sampling {
    int max_tokens;            /* 0: 256 */
    float temperature;         /* 0: greedy */
    float top_p;               /* 0 or 1: off */
    int top_k;                 /* 0: off */
    float repetition_penalty;  /* 0 or 1: off */
    int64_t seed;              /* -1: random */
    uint64_t request_id;       /* as in er_ask_params */
} er_sampling;

#define ER_SAMPLING_INIT {0, 0.0f, 1.0f, 0, 1.0f, -1, 0}

/* Streamed text: `piece` holds `len` bytes of UTF-8 (NUL-terminated). Return 0 to go on,
 * non-zero to cancel the call. */
typedef int (*er_token_fn)(const char *piece, size_t len, void *user);

/* One retrieved passage. */
typedef struct er_passage {
    int n;                 /* its number in the prompt, [n] in the answer */
    const char *source;    /* file, relative to the ingested folder */
    const char *location;  /* "lines 3-9" or "page 2" */
    const char *heading;   /* "" when none */
    const char *text;      /* the passage (search results); NULL in answers */
    double score;          /* retrieval score (search), 0 in answers */
    int cited;             /* the answer cites [n] */
} er_passage;

typedef struct er_answer {
    const char *question;
    const char *text;           /* the answer */
    size_t text_len;            /* its bytes (text may hold NUL bytes that a model generated) */
    int covered;                /* 0: nothing relevant was retrieved and nothing was generated */
    size_t n_sources;
    const er_passage *sources;
    double ttft_ms;             /* from the call to the first token */
    double total_ms;
    int n_prompt_tokens;
    int n_answer_tokens;
    const char *json;           /* everything (timings, notes) as `edge-rag ask --json` prints it */
} er_answer;

typedef struct er_hits {
    size_t n;
    const er_passage *hits;
    int relevant;         /* the relevance gate's verdict */
} er_hits;

typedef struct er_text {
    const char *text;     /* the completion */
    size_t text_len;      /* its bytes */
    const char *finish;   /* "stop", "length" or "context" */
    int n_prompt_tokens;
    int n_tokens;
} er_text;

typedef struct er_message {
    const char *role;     /* "system", "user" or "assistant" */
    const char *content;
} er_message;

/* The library's version ("0.1.0") and ER_API_VERSION it implements. */
const char *er_version(void);
int er_api_version(void);

/* The calling thread's last error message ("" after a success). */
const char *er_last_error(void);

/* Open a runtime. `opts` NULL means ER_OPTIONS_INIT. *out is NULL on failure. */
er_status er_open(const er_options *opts, er_runtime **out);

/* Close it (NULL is a no-op). Calls still running on other threads must have returned. */
void er_close(er_runtime *rt);

/* Retrieve, generate with the passages as numbered sources, stream through `on_token` (may be NULL). */
er_status er_ask(er_runtime *rt, const char *question, const er_ask_params *params,
                 er_token_fn on_token, void *user, er_answer **out);
void er_answer_free(er_answer *a);

/* The ranked passages for a query, no generation. */
er_status er_search(er_runtime *rt, const char *query, int k, const char *mode, er_hits **out);
void er_hits_free(er_hits *h);

/* The embedder's dimension, then embeddings of `n` texts into `out` (n * dim floats, row-major). */
er_status er_embedding_dim(er_runtime *rt, size_t *dim);
er_status er_embed(er_runtime *rt, const char *const *texts, size_t n, float *out, size_t out_len);

/* Raw completion of `prompt` (no chat template), or a reply to `messages` (the model's template). */
er_status er_generate(er_runtime *rt, const char *prompt, const er_sampling *params,
                      er_token_fn on_token, void *user, er_text **out);
er_status er_chat(er_runtime *rt, const er_message *messages, size_t n_messages, const er_sampling *params,
                  er_token_fn on_token, void *user, er_text **out);
void er_text_free(er_text *t);

/* Cancel the call running (or waiting) with `request_id`: it returns ER_CANCELLED at its next token.
 * ER_NOT_FOUND when no such call is in flight. */
er_status er_cancel(er_runtime *rt, uint64_t request_id);

/* A short name for a status ("ER_NOT_FOUND"). */
const char *er_status_name(er_status s);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_RAG_H */
