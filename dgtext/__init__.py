"""Torch-free text handling shared by the engine and the API: checkpoint file resolution, the prompt
tokenizer with its chat template, and edit-span planning.

Kept apart from `engine` so that the API process (which must never import torch) can count prompt
tokens with exactly the tokenizer the worker uses.
"""
