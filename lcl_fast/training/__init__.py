"""The parts of ``python -m lcl_fast.train``: config, distributed set-up, optimizer, checkpoints, logs, loop.

Each module is small and usable alone; :mod:`lcl_fast.train` strings them together.
"""
