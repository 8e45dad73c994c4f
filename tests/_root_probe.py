"""Run as ``python -m tests._root_probe [--kernels-only]`` from the repository root (tests/test_repo_root.py):
prints where ``kernels`` and transformers' CLIPVisionModel came from, as JSON."""

import importlib.util
import json
import sys

import kernels

if "--kernels-only" in sys.argv:
    print(json.dumps([kernels.__file__, hasattr(kernels, "get_kernel")]))
else:
    import transformers
    from transformers import CLIPVisionModel

    print(json.dumps({
        "kernels": getattr(kernels, "__file__", None),
        "find_spec": importlib.util.find_spec("kernels").origin,
        "has_get_kernel": hasattr(kernels, "get_kernel"),
        "transformers": transformers.__version__,
        "clip": CLIPVisionModel.__module__,
    }))
