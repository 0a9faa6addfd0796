"""Running the server beyond one process: Ray Serve replicas (ray_serve.py), the prefix-affinity
routing they use (routing.py), and the in-process forwarding of HTTP requests (forwarding.py)."""
