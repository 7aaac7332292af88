"""The edge_rag node: the `ask` service and the streaming `ask` action over edge-rag's Python API.

    ros2 service call /edge_rag/ask edge_rag_interfaces/srv/Ask "{question: 'What does error E-214 mean?'}"
    ros2 action send_goal --feedback /edge_rag/ask_stream edge_rag_interfaces/action/Ask "{question: 'E-214?'}"

Thin on purpose: parameters -> edge.runtime.host.EdgeRuntime, requests -> EdgeRuntime.ask, the
answer -> the interface's fields. Callbacks run in a reentrant group on a multi-threaded executor,
so several requests are answered at once (the runtime's engine batches their generation).
A cancelled action goal stops its generation at the next token.

UNTESTED: written against the documented rclpy API (Humble/Jazzy); ROS 2 cannot be installed on
the machines edge-rag is developed on.
"""

from __future__ import annotations

import os


class _Cancelled(Exception):
    pass


def _fill(target, answer: dict, source_cls) -> None:
    """Copy an edge-rag answer (rag.ask.Answer.to_dict()) into a service response / action result."""
    target.success = True
    target.error = ""
    target.answer = answer["text"]
    target.covered = bool(answer["covered"])
    target.sources = [source_cls(n=int(s["n"]), source=str(s["source"]), location=str(s["location"]),
                                 heading=str(s.get("heading") or ""), cited=bool(s["cited"]))
                      for s in answer["sources"]]
    t = answer.get("timings") or {}
    target.ttft_ms = float(t.get("ttft_ms", 0.0))
    target.total_ms = float(t.get("total_ms", 0.0))


def main(args=None) -> None:
    import rclpy
    from rclpy.action import ActionServer, CancelResponse, GoalResponse
    from rclpy.callback_groups import ReentrantCallbackGroup
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node

    from edge_rag_interfaces.action import Ask as AskAction
    from edge_rag_interfaces.msg import Source
    from edge_rag_interfaces.srv import Ask as AskService

    class EdgeRagNode(Node):
        def __init__(self):
            super().__init__("edge_rag")
            p = {name: self.declare_parameter(name, default).value for name, default in (
                ("collection", "default"), ("engine", ""), ("embedder", ""), ("backend", "auto"), ("threads", 0),
                ("home", ""), ("default_k", 5), ("default_max_tokens", 256))}
            if p["home"]:
                os.environ["EDGE_RAG_HOME"] = p["home"]
            self.default_k, self.default_max_tokens = int(p["default_k"]), int(p["default_max_tokens"])
            self.runtime = self._open(p)
            group = ReentrantCallbackGroup()
            self.create_service(AskService, "~/ask", self.on_ask, callback_group=group)
            ActionServer(self, AskAction, "~/ask_stream", execute_callback=self.on_goal, callback_group=group,
                         goal_callback=lambda _: GoalResponse.ACCEPT, cancel_callback=lambda _: CancelResponse.ACCEPT)
            self.get_logger().info(f"edge-rag ready: collection '{p['collection']}', services ~/ask and ~/ask_stream")

        def _open(self, p: dict):
            """The same runtime `edge-rag serve` opens: the collection's embedder, the generator loaded now."""
            from pathlib import Path

            from edge.cli.generate_cmd import _generator
            from edge.cli.rag_cmd import _embedder, _require_collection
            from edge.runtime.host import EdgeRuntime

            _require_collection(p["collection"])
            emb, _ = _embedder(Path(p["embedder"]) if p["embedder"] else None, p["collection"])
            gen = _generator(Path(p["engine"]) if p["engine"] else None, p["backend"], int(p["threads"]) or None)
            return EdgeRuntime(p["collection"], embedder=emb, generator=gen, backend=p["backend"])

        def _ask(self, question: str, k: int, max_tokens: int, on_token=None) -> dict:
            return self.runtime.ask(question, k=k or self.default_k, max_tokens=max_tokens or self.default_max_tokens,
                                    on_token=on_token).to_dict()

        def on_ask(self, request, response):
            from edge.errors import EdgeRagError

            try:
                _fill(response, self._ask(request.question, request.k, request.max_tokens), Source)
            except EdgeRagError as e:  # a bad question / missing collection: said in the response, node keeps going
                response.success, response.error = False, str(e)
            return response

        def on_goal(self, goal_handle):
            from edge.errors import EdgeRagError

            g = goal_handle.request
            seq = 0

            def on_token(delta: str) -> None:
                nonlocal seq
                if goal_handle.is_cancel_requested:
                    raise _Cancelled
                fb = AskAction.Feedback()
                fb.seq, fb.delta = seq, delta
                goal_handle.publish_feedback(fb)
                seq += 1

            result = AskAction.Result()
            try:
                _fill(result, self._ask(g.question, g.k, g.max_tokens, on_token), Source)
                goal_handle.succeed()
            except _Cancelled:
                result.success, result.error = False, "cancelled"
                goal_handle.canceled()
            except EdgeRagError as e:
                result.success, result.error = False, str(e)
                goal_handle.abort()
            return result

    rclpy.init(args=args)
    node = EdgeRagNode()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except KeyboardInterrupt:
        pass
    finally:
        node.runtime.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
