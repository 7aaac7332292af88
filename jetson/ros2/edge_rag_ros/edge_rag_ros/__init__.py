"""edge-rag as a ROS 2 node (see node.py). Untested: ROS 2 cannot be installed where edge-rag is developed."""
