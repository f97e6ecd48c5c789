"""Runtime: backends that execute compiled graphs (ONNX Runtime now; generated C later)."""
