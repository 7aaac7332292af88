"""The ROS 2 packages under jetson/ros2 cannot run here (no ROS 2): check what can be checked
without it — the manifests parse and agree, the node module compiles and its one pure function
copies an edge-rag answer into the interface fields."""

from __future__ import annotations

import ast
import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

ROS2 = Path(__file__).resolve().parent.parent / "jetson" / "ros2"


def test_manifests_and_entry_point():
    ros = ET.parse(ROS2 / "edge_rag_ros" / "package.xml").getroot()
    assert ros.findtext("name") == "edge_rag_ros" and ros.find("export/build_type").text == "ament_python"
    assert "edge_rag_interfaces" in [d.text for d in ros.findall("exec_depend")]
    itf = ET.parse(ROS2 / "edge_rag_interfaces" / "package.xml").getroot()
    assert itf.findtext("name") == "edge_rag_interfaces" and itf.find("export/build_type").text == "ament_cmake"
    cmake = (ROS2 / "edge_rag_interfaces" / "CMakeLists.txt").read_text()
    for f in ("msg/Source.msg", "srv/Ask.srv", "action/Ask.action"):
        assert f'"{f}"' in cmake and (ROS2 / "edge_rag_interfaces" / f).is_file()
    setup = (ROS2 / "edge_rag_ros" / "setup.py").read_text()
    assert "edge_rag_node = {package_name}.node:main" in setup and 'package_name = "edge_rag_ros"' in setup
    for f in ("edge_rag_ros/node.py", "launch/edge_rag.launch.py", "setup.py"):
        ast.parse((ROS2 / "edge_rag_ros" / f).read_text())


def test_fill_copies_an_answer_into_the_interface_fields():
    spec = importlib.util.spec_from_file_location("edge_rag_ros_node", ROS2 / "edge_rag_ros" / "edge_rag_ros" / "node.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)  # rclpy is imported inside main() only
    answer = {"text": "E-214 means low coolant [1].", "covered": True, "timings": {"ttft_ms": 12.5, "total_ms": 80.0},
              "sources": [{"n": 1, "source": "error_codes.md", "location": "lines 3-9", "heading": "E-214", "cited": True},
                          {"n": 2, "source": "faq.md", "location": "line 4", "heading": None, "cited": False}]}
    res = SimpleNamespace()
    node._fill(res, answer, SimpleNamespace)
    assert (res.success, res.error, res.answer, res.covered, res.ttft_ms, res.total_ms) == (
        True, "", answer["text"], True, 12.5, 80.0)
    assert [(s.n, s.source, s.location, s.heading, s.cited) for s in res.sources] == [
        (1, "error_codes.md", "lines 3-9", "E-214", True), (2, "faq.md", "line 4", "", False)]
    # the srv and the action result carry the same fields _fill sets
    fields = {"success", "error", "answer", "covered", "sources", "ttft_ms", "total_ms"}
    for f in ("srv/Ask.srv", "action/Ask.action"):
        result = (ROS2 / "edge_rag_interfaces" / f).read_text().split("---")[1]
        names = {ln.split()[1] for ln in result.splitlines() if ln.strip() and not ln.strip().startswith("#")}
        assert names == fields, f
