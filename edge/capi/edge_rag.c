/*
 * libedgerag.so: the C ABI of include/edge_rag.h over edge-rag's Python runtime.
 *
 * Thin on purpose: every call takes the GIL, calls one function of edge.capi.bridge (which
 * returns (status, message, plain value) and never raises), converts the value into C-owned
 * memory and releases the GIL. Scheduling, locking and cancellation live in Python, so this file
 * does not change when the engine core (edge.runtime.engine) takes over the requests.
 *
 * The interpreter: started on the first call unless the host already runs Python. Its program
 * name is $EDGE_RAG_PYTHON, else ER_DEFAULT_PYTHON (the python `make capi` built with), so a virtualenv's
 * pyvenv.cfg and site-packages apply. It never steals the host's signals and is never finalized
 * (extension modules such as onnxruntime cannot be unloaded safely).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_rag.h"

#ifndef ER_DEFAULT_PYTHON
#define ER_DEFAULT_PYTHON ""
#endif

#define ER_EXPORT __attribute__((visibility("default")))
#define ERR_LEN 2048

struct er_runtime {
    PyObject *obj; /* edge.capi.bridge.Runtime */
};

/* One message per thread: er_last_error() of the calling thread (no allocation, nothing to free). */
static __thread char tls_error[ERR_LEN];

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static er_status init_status = ER_OK;
static char init_error[ERR_LEN];
static PyObject *bridge; /* edge.capi.bridge, kept for the life of the process */

static er_status fail(er_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tls_error, ERR_LEN, fmt, ap);
    va_end(ap);
    return s;
}

static er_status ok(void) {
    tls_error[0] = '\0';
    return ER_OK;
}

/* The pending Python exception as one line (and cleared). GIL held. */
static void exception_text(char *buf, size_t n) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *s = value ? PyObject_Str(value) : NULL;
    const char *name = type ? ((PyTypeObject *)type)->tp_name : "error";
    const char *msg = s ? PyUnicode_AsUTF8(s) : NULL;
    snprintf(buf, n, "%s: %s", name, msg ? msg : "?");
    PyErr_Clear();
    Py_XDECREF(s);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static void import_bridge(const char *python) {
    bridge = PyImport_ImportModule("edge.capi.bridge");
    if (bridge == NULL) {
        char why[ERR_LEN / 2];
        exception_text(why, sizeof why);
        snprintf(init_error, ERR_LEN,
                 "cannot import edge-rag in the embedded Python (%s): %s (set EDGE_RAG_PYTHON to the python of an "
                 "environment where edge-rag is installed)",
                 python && *python ? python : "default python", why);
        init_status = ER_PYTHON;
    }
}

static void init_python(void) {
    const char *python = getenv("EDGE_RAG_PYTHON");
    if (python == NULL || *python == '\0') python = ER_DEFAULT_PYTHON;
    if (Py_IsInitialized()) { /* loaded into a Python process: share its interpreter */
        PyGILState_STATE g = PyGILState_Ensure();
        import_bridge(NULL);
        PyGILState_Release(g);
        return;
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* SIGINT & co. stay the host's */
    config.parse_argv = 0;
    PyStatus st = PyStatus_Ok();
    if (*python) st = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {
        snprintf(init_error, ERR_LEN, "cannot start the Python interpreter (%s): %s (set EDGE_RAG_PYTHON)",
                 *python ? python : "default python", st.err_msg ? st.err_msg : "unknown error");
        init_status = ER_PYTHON;
        return;
    }
    import_bridge(python);
    PyEval_SaveThread(); /* every thread, this one included, takes the GIL per call */
}

static er_status ensure_python(void) {
    pthread_once(&init_once, init_python);
    if (init_status != ER_OK) return fail(init_status, "%s", init_error);
    return ER_OK;
}

/* Call bridge.<name>(*args) (steals `args`). On ER_OK, *value is a new reference (may be None).
 * GIL held. */
static er_status call(const char *name, PyObject *args, PyObject **value) {
    *value = NULL;
    if (args == NULL) {
        char why[ERR_LEN];
        exception_text(why, sizeof why);
        return fail(ER_INTERNAL, "internal error building the arguments of %s: %s", name, why);
    }
    PyObject *fn = PyObject_GetAttrString(bridge, name);
    PyObject *r = fn ? PyObject_CallObject(fn, args) : NULL;
    Py_XDECREF(fn);
    Py_DECREF(args);
    if (r == NULL || !PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 3) {
        char why[ERR_LEN];
        if (PyErr_Occurred())
            exception_text(why, sizeof why);
        else
            snprintf(why, sizeof why, "unexpected result");
        Py_XDECREF(r);
        return fail(ER_INTERNAL, "internal error in edge.capi.bridge.%s: %s", name, why);
    }
    long status = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
    if (status != ER_OK) {
        const char *msg = PyUnicode_AsUTF8(PyTuple_GET_ITEM(r, 1));
        er_status s = fail((er_status)status, "%s", msg ? msg : "unknown error");
        PyErr_Clear();
        Py_DECREF(r);
        return s;
    }
    *value = PyTuple_GET_ITEM(r, 2);
    Py_INCREF(*value);
    Py_DECREF(r);
    return ok();
}

/* ---- token callbacks -------------------------------------------------------------------- */

typedef struct token_sink {
    er_token_fn fn;
    void *user;
} token_sink;

#define SINK_CAPSULE "edge_rag.token_sink"

/* bridge calls emit(piece) -> True to cancel. The user's callback runs without the GIL, so other
 * threads' calls go on while it prints, publishes or blocks. */
static PyObject *emit_token(PyObject *capsule, PyObject *piece) {
    token_sink *sink = (token_sink *)PyCapsule_GetPointer(capsule, SINK_CAPSULE);
    if (sink == NULL) return NULL;
    Py_ssize_t len = 0;
    const char *p = PyUnicode_AsUTF8AndSize(piece, &len);
    if (p == NULL) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = sink->fn(p, (size_t)len, sink->user);
    Py_END_ALLOW_THREADS return PyBool_FromLong(rc != 0);
}

static PyMethodDef emit_def = {"emit", emit_token, METH_O, "Forward one streamed piece to the C callback."};

/* A new reference: a callable over `sink` (which must outlive the call), or None. */
static PyObject *make_emit(token_sink *sink) {
    if (sink->fn == NULL) Py_RETURN_NONE;
    PyObject *cap = PyCapsule_New(sink, SINK_CAPSULE, NULL);
    if (cap == NULL) return NULL;
    PyObject *f = PyCFunction_New(&emit_def, cap);
    Py_DECREF(cap);
    return f;
}

/* ---- C-owned copies of results ---------------------------------------------------------- */

typedef struct strings {
    char **items;
    size_t n, cap;
} strings;

/* A C-owned copy of `len` bytes (NUL-terminated). */
static const char *keep_n(strings *s, const char *text, size_t len) {
    if (text == NULL) text = "", len = 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        char **items = (char **)realloc(s->items, cap * sizeof *items);
        if (items == NULL) return "";
        s->items = items;
        s->cap = cap;
    }
    char *copy = (char *)malloc(len + 1);
    if (copy == NULL) return "";
    memcpy(copy, text, len);
    copy[len] = '\0';
    s->items[s->n++] = copy;
    return copy;
}

static const char *keep(strings *s, const char *text) { return keep_n(s, text, text ? strlen(text) : 0); }

static void strings_free(strings *s) {
    for (size_t i = 0; i < s->n; i++) free(s->items[i]);
    free(s->items);
    s->items = NULL;
    s->n = s->cap = 0;
}

/* dict[key] as text ("" when absent or None), its length in *len when asked. GIL held. */
static const char *keep_item_n(strings *s, PyObject *d, const char *key, size_t *len) {
    PyObject *v = PyDict_GetItemString(d, key);
    Py_ssize_t n = 0;
    const char *p = v && PyUnicode_Check(v) ? PyUnicode_AsUTF8AndSize(v, &n) : NULL;
    if (p == NULL) PyErr_Clear(), n = 0;
    if (len) *len = (size_t)n;
    return keep_n(s, p, (size_t)n);
}

static const char *keep_item(strings *s, PyObject *d, const char *key) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (v == NULL || v == Py_None) return keep(s, "");
    if (PyUnicode_Check(v)) return keep_item_n(s, d, key, NULL);
    PyObject *str = PyObject_Str(v);
    const char *r = keep(s, str ? PyUnicode_AsUTF8(str) : "");
    Py_XDECREF(str);
    PyErr_Clear();
    return r;
}

static double num_item(PyObject *d, const char *key) {
    PyObject *v = d ? PyDict_GetItemString(d, key) : NULL;
    double x = v && v != Py_None ? PyFloat_AsDouble(v) : 0.0;
    if (PyErr_Occurred()) {
        PyErr_Clear();
        x = 0.0;
    }
    return x;
}

static int flag_item(PyObject *d, const char *key) {
    PyObject *v = PyDict_GetItemString(d, key);
    return v != NULL && PyObject_IsTrue(v) == 1;
}

/* er_passage list from a Python list of dicts. */
static er_passage *passages(strings *s, PyObject *list, size_t *n, int with_text) {
    *n = list && PyList_Check(list) ? (size_t)PyList_GET_SIZE(list) : 0;
    er_passage *out = (er_passage *)calloc(*n ? *n : 1, sizeof *out);
    if (out == NULL) {
        *n = 0;
        return NULL;
    }
    for (size_t i = 0; i < *n; i++) {
        PyObject *d = PyList_GET_ITEM(list, i);
        if (!PyDict_Check(d)) continue;
        out[i].n = PyDict_GetItemString(d, "n") ? (int)num_item(d, "n") : (int)i + 1;
        out[i].source = keep_item(s, d, "source");
        out[i].location = keep_item(s, d, "location");
        out[i].heading = keep_item(s, d, "heading");
        out[i].text = with_text ? keep_item(s, d, "text") : NULL;
        out[i].score = num_item(d, "score");
        out[i].cited = flag_item(d, "cited");
    }
    return out;
}

typedef struct answer_impl {
    er_answer pub; /* first: er_answer_free casts back */
    er_passage *sources;
    strings s;
} answer_impl;

typedef struct hits_impl {
    er_hits pub;
    er_passage *hits;
    strings s;
} hits_impl;

typedef struct text_impl {
    er_text pub;
    strings s;
} text_impl;

/* ---- the API ---------------------------------------------------------------------------- */

ER_EXPORT const char *er_version(void) { return "0.1.0"; }
ER_EXPORT int er_api_version(void) { return ER_API_VERSION; }
ER_EXPORT const char *er_last_error(void) { return tls_error; }

ER_EXPORT const char *er_status_name(er_status s) {
    static const char *names[] = {"ER_OK",           "ER_INVALID_ARGUMENT", "ER_NOT_FOUND", "ER_NO_COLLECTION",
                                  "ER_CONTEXT_LENGTH", "ER_CANCELLED",      "ER_BACKEND",   "ER_PYTHON",
                                  "ER_INTERNAL"};
    return (unsigned)s < sizeof names / sizeof *names ? names[s] : "ER_UNKNOWN";
}

static PyObject *str_or_none(const char *s) {
    if (s == NULL) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace");
}

ER_EXPORT er_status er_open(const er_options *opts, er_runtime **out) {
    static const er_options defaults = ER_OPTIONS_INIT;
    if (out == NULL) return fail(ER_INVALID_ARGUMENT, "er_open: out is NULL (pass the address of an er_runtime *)");
    *out = NULL;
    if (opts == NULL) opts = &defaults;
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    er_runtime *rt = (er_runtime *)calloc(1, sizeof *rt);
    if (rt == NULL) return fail(ER_INTERNAL, "er_open: out of memory");
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *value;
    st = call("open_runtime",
              Py_BuildValue("(NNNNiiN)", str_or_none(opts->generator_bundle), str_or_none(opts->embedder_bundle),
                            str_or_none(opts->collection), str_or_none(opts->backend), opts->threads,
                            opts->load_generator, str_or_none(opts->home)),
              &value);
    PyGILState_Release(g);
    if (st != ER_OK) {
        free(rt);
        return st;
    }
    rt->obj = value;
    *out = rt;
    return ok();
}

ER_EXPORT void er_close(er_runtime *rt) {
    if (rt == NULL) return;
    if (ensure_python() == ER_OK && rt->obj != NULL) {
        PyGILState_STATE g = PyGILState_Ensure();
        PyObject *value;
        if (call("close", Py_BuildValue("(O)", rt->obj), &value) == ER_OK) Py_DECREF(value);
        Py_DECREF(rt->obj);
        PyGILState_Release(g);
    }
    free(rt);
}

ER_EXPORT er_status er_ask(er_runtime *rt, const char *question, const er_ask_params *params, er_token_fn on_token,
                           void *user, er_answer **out) {
    static const er_ask_params defaults = ER_ASK_PARAMS_INIT;
    if (out == NULL) return fail(ER_INVALID_ARGUMENT, "er_ask: out is NULL (pass the address of an er_answer *)");
    *out = NULL;
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_ask: rt is NULL (open one with er_open)");
    if (question == NULL) return fail(ER_INVALID_ARGUMENT, "er_ask: question is NULL");
    if (params == NULL) params = &defaults;
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    token_sink sink = {on_token, user};
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *emit = make_emit(&sink);
    PyObject *value = NULL;
    st = call("ask",
              emit ? Py_BuildValue("(ONiNiKO)", rt->obj, str_or_none(question), params->k, str_or_none(params->mode),
                                   params->max_tokens, (unsigned long long)params->request_id, emit)
                   : NULL,
              &value);
    Py_XDECREF(emit);
    if (st == ER_OK) {
        answer_impl *a = (answer_impl *)calloc(1, sizeof *a);
        PyObject *d = PyTuple_Check(value) && PyTuple_GET_SIZE(value) == 2 ? PyTuple_GET_ITEM(value, 0) : NULL;
        if (a == NULL || d == NULL || !PyDict_Check(d)) {
            free(a);
            st = fail(ER_INTERNAL, "er_ask: unexpected answer from the runtime");
        } else {
            PyObject *timings = PyDict_GetItemString(d, "timings");
            a->pub.question = keep_item(&a->s, d, "question");
            a->pub.text = keep_item_n(&a->s, d, "text", &a->pub.text_len);
            a->pub.covered = flag_item(d, "covered");
            a->sources = passages(&a->s, PyDict_GetItemString(d, "sources"), &a->pub.n_sources, 0);
            a->pub.sources = a->sources;
            a->pub.ttft_ms = timings && PyDict_Check(timings) ? num_item(timings, "ttft_ms") : 0.0;
            a->pub.total_ms = timings && PyDict_Check(timings) ? num_item(timings, "total_ms") : 0.0;
            a->pub.n_prompt_tokens = (int)num_item(d, "n_prompt_tokens");
            a->pub.n_answer_tokens = (int)num_item(d, "n_answer_tokens");
            a->pub.json = keep(&a->s, PyUnicode_AsUTF8(PyTuple_GET_ITEM(value, 1)));
            PyErr_Clear();
            *out = &a->pub;
        }
        Py_DECREF(value);
    }
    PyGILState_Release(g);
    return st;
}

ER_EXPORT void er_answer_free(er_answer *a) {
    if (a == NULL) return;
    answer_impl *impl = (answer_impl *)a;
    strings_free(&impl->s);
    free(impl->sources);
    free(impl);
}

ER_EXPORT er_status er_search(er_runtime *rt, const char *query, int k, const char *mode, er_hits **out) {
    if (out == NULL) return fail(ER_INVALID_ARGUMENT, "er_search: out is NULL (pass the address of an er_hits *)");
    *out = NULL;
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_search: rt is NULL (open one with er_open)");
    if (query == NULL) return fail(ER_INVALID_ARGUMENT, "er_search: query is NULL");
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *value;
    st = call("search", Py_BuildValue("(ONiN)", rt->obj, str_or_none(query), k, str_or_none(mode)), &value);
    if (st == ER_OK) {
        hits_impl *h = (hits_impl *)calloc(1, sizeof *h);
        if (h == NULL || !PyDict_Check(value)) {
            free(h);
            st = fail(ER_INTERNAL, "er_search: unexpected result from the runtime");
        } else {
            h->hits = passages(&h->s, PyDict_GetItemString(value, "hits"), &h->pub.n, 1);
            h->pub.hits = h->hits;
            h->pub.relevant = flag_item(value, "relevant");
            *out = &h->pub;
        }
        Py_DECREF(value);
    }
    PyGILState_Release(g);
    return st;
}

ER_EXPORT void er_hits_free(er_hits *h) {
    if (h == NULL) return;
    hits_impl *impl = (hits_impl *)h;
    strings_free(&impl->s);
    free(impl->hits);
    free(impl);
}

ER_EXPORT er_status er_embedding_dim(er_runtime *rt, size_t *dim) {
    if (dim == NULL) return fail(ER_INVALID_ARGUMENT, "er_embedding_dim: dim is NULL");
    *dim = 0;
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_embedding_dim: rt is NULL (open one with er_open)");
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *value;
    st = call("embedding_dim", Py_BuildValue("(O)", rt->obj), &value);
    if (st == ER_OK) {
        *dim = (size_t)PyLong_AsSize_t(value);
        Py_DECREF(value);
    }
    PyGILState_Release(g);
    return st;
}

ER_EXPORT er_status er_embed(er_runtime *rt, const char *const *texts, size_t n, float *out, size_t out_len) {
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_embed: rt is NULL (open one with er_open)");
    if (texts == NULL || out == NULL) return fail(ER_INVALID_ARGUMENT, "er_embed: texts and out must not be NULL");
    if (n == 0) return fail(ER_INVALID_ARGUMENT, "er_embed: n is 0 (give at least one text)");
    for (size_t i = 0; i < n; i++)
        if (texts[i] == NULL) return fail(ER_INVALID_ARGUMENT, "er_embed: texts[%zu] is NULL", i);
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *s = str_or_none(texts[i]);
        if (s == NULL) Py_CLEAR(list); else PyList_SET_ITEM(list, (Py_ssize_t)i, s);
    }
    PyObject *value;
    st = call("embed", list ? Py_BuildValue("(ON)", rt->obj, list) : NULL, &value);
    if (st == ER_OK) {
        char *buf;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(value, &buf, &len) != 0 || len % (Py_ssize_t)(n * sizeof(float)) != 0) {
            PyErr_Clear();
            st = fail(ER_INTERNAL, "er_embed: unexpected result from the runtime");
        } else if ((size_t)len > out_len * sizeof(float)) {
            st = fail(ER_INVALID_ARGUMENT, "er_embed: out holds %zu floats, %zu texts need %zu (n * er_embedding_dim)",
                      out_len, n, (size_t)len / sizeof(float));
        } else {
            memcpy(out, buf, (size_t)len);
        }
        Py_DECREF(value);
    }
    PyGILState_Release(g);
    return st;
}

/* er_generate (prompt) and er_chat (messages) share this: `prompt_obj` is stolen. */
static er_status generate(const char *who, er_runtime *rt, PyObject *prompt_obj, const er_sampling *params,
                          er_token_fn on_token, void *user, er_text **out) {
    static const er_sampling defaults = ER_SAMPLING_INIT;
    if (params == NULL) params = &defaults;
    token_sink sink = {on_token, user};
    PyObject *emit = make_emit(&sink);
    PyObject *args = NULL;
    if (emit != NULL && prompt_obj != NULL)
        args = Py_BuildValue("(OOidfifLKO)", rt->obj, prompt_obj, params->max_tokens, (double)params->temperature,
                             (double)params->top_p, params->top_k, (double)params->repetition_penalty,
                             (long long)params->seed, (unsigned long long)params->request_id, emit);
    Py_XDECREF(prompt_obj);
    PyObject *value;
    er_status st = call("generate", args, &value);
    Py_XDECREF(emit);
    if (st == ER_OK) {
        text_impl *t = (text_impl *)calloc(1, sizeof *t);
        if (t == NULL || !PyDict_Check(value)) {
            free(t);
            st = fail(ER_INTERNAL, "%s: unexpected result from the runtime", who);
        } else {
            t->pub.text = keep_item_n(&t->s, value, "text", &t->pub.text_len);
            t->pub.finish = keep_item(&t->s, value, "finish");
            t->pub.n_prompt_tokens = (int)num_item(value, "n_prompt_tokens");
            t->pub.n_tokens = (int)num_item(value, "n_tokens");
            *out = &t->pub;
        }
        Py_DECREF(value);
    }
    return st;
}

ER_EXPORT er_status er_generate(er_runtime *rt, const char *prompt, const er_sampling *params, er_token_fn on_token,
                                void *user, er_text **out) {
    if (out == NULL) return fail(ER_INVALID_ARGUMENT, "er_generate: out is NULL (pass the address of an er_text *)");
    *out = NULL;
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_generate: rt is NULL (open one with er_open)");
    if (prompt == NULL) return fail(ER_INVALID_ARGUMENT, "er_generate: prompt is NULL");
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    PyGILState_STATE g = PyGILState_Ensure();
    st = generate("er_generate", rt, str_or_none(prompt), params, on_token, user, out);
    PyGILState_Release(g);
    return st;
}

ER_EXPORT er_status er_chat(er_runtime *rt, const er_message *messages, size_t n_messages, const er_sampling *params,
                            er_token_fn on_token, void *user, er_text **out) {
    if (out == NULL) return fail(ER_INVALID_ARGUMENT, "er_chat: out is NULL (pass the address of an er_text *)");
    *out = NULL;
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_chat: rt is NULL (open one with er_open)");
    if (messages == NULL || n_messages == 0)
        return fail(ER_INVALID_ARGUMENT, "er_chat: messages is NULL or empty (give at least one message)");
    for (size_t i = 0; i < n_messages; i++)
        if (messages[i].role == NULL || messages[i].content == NULL)
            return fail(ER_INVALID_ARGUMENT, "er_chat: messages[%zu] has a NULL role or content", i);
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *list = PyList_New((Py_ssize_t)n_messages);
    for (size_t i = 0; list != NULL && i < n_messages; i++) {
        PyObject *m = Py_BuildValue("{s:N,s:N}", "role", str_or_none(messages[i].role), "content",
                                    str_or_none(messages[i].content));
        if (m == NULL) Py_CLEAR(list); else PyList_SET_ITEM(list, (Py_ssize_t)i, m);
    }
    st = generate("er_chat", rt, list, params, on_token, user, out);
    PyGILState_Release(g);
    return st;
}

ER_EXPORT void er_text_free(er_text *t) {
    if (t == NULL) return;
    text_impl *impl = (text_impl *)t;
    strings_free(&impl->s);
    free(impl);
}

ER_EXPORT er_status er_cancel(er_runtime *rt, uint64_t request_id) {
    if (rt == NULL) return fail(ER_INVALID_ARGUMENT, "er_cancel: rt is NULL");
    if (request_id == 0) return fail(ER_INVALID_ARGUMENT, "er_cancel: request id 0 names no call (set request_id)");
    er_status st = ensure_python();
    if (st != ER_OK) return st;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *value;
    st = call("cancel", Py_BuildValue("(OK)", rt->obj, (unsigned long long)request_id), &value);
    if (st == ER_OK) Py_DECREF(value);
    PyGILState_Release(g);
    return st;
}
