"""LoRA adapters served beside one base model (issue 14): PEFT folders read and checked
(peft.py), combined (compose.py), and registered with their factors and the LoRA graph variant that
runs adapter rows (registry.py; the graph rewrite is passes/lora/)."""

from .peft import AdapterError, LoraAdapter, LoraModule, read_adapter
from .registry import AdapterRef, AdapterRegistry, check_name

__all__ = ["AdapterError", "AdapterRef", "AdapterRegistry", "LoraAdapter", "LoraModule", "check_name", "read_adapter"]
