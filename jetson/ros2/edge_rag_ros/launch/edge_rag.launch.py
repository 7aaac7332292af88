"""ros2 launch edge_rag_ros edge_rag.launch.py [params:=my_params.yaml]  (untested, see the package README)."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("edge_rag_ros"), "config", "params.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("params", default_value=default_params,
                              description="YAML with the edge_rag node's parameters (collection, engine, backend, ...)"),
        Node(package="edge_rag_ros", executable="edge_rag_node", name="edge_rag", output="screen",
             parameters=[LaunchConfiguration("params")]),
    ])
