from glob import glob

from setuptools import setup

package_name = "edge_rag_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", glob("launch/*.launch.py")),
        (f"share/{package_name}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],  # edge-rag: `pip install edge-rag` in the same Python (not a rosdep key)
    zip_safe=True,
    maintainer="edge-rag maintainers",
    maintainer_email="maintainers@edge-rag.invalid",
    description="edge-rag as a ROS 2 node: ask service and streaming ask action",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"edge_rag_node = {package_name}.node:main"]},
)
