"""ftlab: fine-tune LLMs from a notebook cell.

Importing ftlab is cheap: torch, transformers and TRL load only when a run needs them.
"""
__version__ = "0.1.0"
