// robot_node.cpp - the shape of a middleware node (an rclcpp node, a vendor SDK callback) over
// libedgerag.so: requests arrive on a queue, worker threads answer them while streaming tokens,
// and every event is "published" as one JSON line on stdout (swap publish() for your transport).
//
//   make capi
//   c++ -std=c++17 -Iinclude examples/cpp/robot_node.cpp -Lbuild -ledgerag -Wl,-rpath,$PWD/build -pthread -o build/robot_node
//   printf 'What does error E-214 mean?\nHow do I calibrate the lidar?\n' | build/robot_node --workers 2
//
// Events: {"event":"token","id":N,"text":...}  {"event":"answer","id":N,"question":...,"text":...,
// "sources":["file, lines a-b", ...],"ttft_ms":...,"total_ms":...}  {"event":"error","id":N,"message":...}
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "edge_rag.h"

namespace {

std::string json_string(const char *s, size_t n) {
    std::string out = "\"";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);  // UTF-8 passes through
                }
        }
    }
    return out + "\"";
}

std::string json_string(const std::string &s) { return json_string(s.data(), s.size()); }

// One line per event; the lock keeps lines from different workers whole.
std::mutex publish_mu;
void publish(const std::string &line) {
    std::lock_guard<std::mutex> lock(publish_mu);
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

struct Request {
    uint64_t id;
    std::string question;
};

// A closable blocking queue: pop() returns nothing once closed and drained.
class RequestQueue {
  public:
    void push(Request r) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            q_.push_back(std::move(r));
        }
        cv_.notify_one();
    }
    void close() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            closed_ = true;
        }
        cv_.notify_all();
    }
    std::optional<Request> pop() {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return closed_ || !q_.empty(); });
        if (q_.empty()) return std::nullopt;
        Request r = std::move(q_.front());
        q_.pop_front();
        return r;
    }

  private:
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Request> q_;
    bool closed_ = false;
};

class RobotNode {
  public:
    RobotNode(er_runtime *rt, int max_tokens) : rt_(rt), max_tokens_(max_tokens) {}

    void serve(RequestQueue &queue) {
        while (auto req = queue.pop()) answer(*req);
    }

    // Stop a request in flight (e.g. the operator asked something else): it ends with ER_CANCELLED.
    void cancel(uint64_t id) { er_cancel(rt_, id); }

  private:
    struct Stream {
        uint64_t id;
    };

    static int on_token(const char *piece, size_t len, void *user) {
        auto *s = static_cast<Stream *>(user);
        publish("{\"event\":\"token\",\"id\":" + std::to_string(s->id) + ",\"text\":" + json_string(piece, len) + "}");
        return 0;
    }

    void answer(const Request &req) {
        er_ask_params params = ER_ASK_PARAMS_INIT;
        params.max_tokens = max_tokens_;
        params.request_id = req.id;
        Stream stream{req.id};
        er_answer *a = nullptr;
        er_status st = er_ask(rt_, req.question.c_str(), &params, on_token, &stream, &a);
        if (st != ER_OK) {
            publish("{\"event\":\"error\",\"id\":" + std::to_string(req.id) + ",\"status\":" +
                    json_string(std::string(er_status_name(st))) + ",\"message\":" +
                    json_string(std::string(er_last_error())) + "}");
            return;
        }
        std::string sources = "[";
        for (size_t i = 0; i < a->n_sources; i++) {
            const er_passage &p = a->sources[i];
            if (i) sources += ",";
            sources += json_string(std::string(p.source) + ", " + p.location);
        }
        sources += "]";
        char timing[96];
        std::snprintf(timing, sizeof timing, ",\"ttft_ms\":%.1f,\"total_ms\":%.1f", a->ttft_ms, a->total_ms);
        publish("{\"event\":\"answer\",\"id\":" + std::to_string(req.id) + ",\"question\":" +
                json_string(std::string(a->question)) + ",\"text\":" + json_string(a->text, a->text_len) +
                ",\"sources\":" + sources + timing + "}");
        er_answer_free(a);
    }

    er_runtime *rt_;
    int max_tokens_;
};

int usage(const char *argv0) {
    std::fprintf(stderr,
                 "usage: %s [--engine DIR] [--collection NAME] [--backend B] [--threads N] [--workers N] "
                 "[--max-tokens N] < questions (one per line)\n",
                 argv0);
    return 2;
}

}  // namespace

int main(int argc, char **argv) {
    er_options opt = ER_OPTIONS_INIT;
    int workers = 1, max_tokens = 256;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (i + 1 >= argc) return usage(argv[0]);
        const char *v = argv[++i];
        if (a == "--engine") opt.generator_bundle = v;
        else if (a == "--collection") opt.collection = v;
        else if (a == "--backend") opt.backend = v;
        else if (a == "--threads") opt.threads = std::atoi(v);
        else if (a == "--workers") workers = std::atoi(v);
        else if (a == "--max-tokens") max_tokens = std::atoi(v);
        else return usage(argv[0]);
    }
    if (workers < 1) return usage(argv[0]);
    opt.load_generator = 1;  // the first request should not pay for loading

    er_runtime *rt = nullptr;
    if (er_status st = er_open(&opt, &rt); st != ER_OK) {
        std::fprintf(stderr, "error: %s: %s\n", er_status_name(st), er_last_error());
        return 1;
    }
    RobotNode node(rt, max_tokens);
    RequestQueue queue;
    std::vector<std::thread> pool;
    for (int i = 0; i < workers; i++) pool.emplace_back([&] { node.serve(queue); });

    uint64_t next_id = 1;
    for (std::string line; std::getline(std::cin, line);)
        if (!line.empty()) queue.push({next_id++, line});
    queue.close();
    for (auto &t : pool) t.join();
    er_close(rt);
    return 0;
}
