"""Generated-C kernel runtime (jinja2 templates -> gcc -> ctypes). Lands with the codegen issue;
nothing here yet, and nothing imports it."""
