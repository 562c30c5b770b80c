"""replit-code-v1-3b without remote code: network, checkpoint loading, tokenizer."""

from model.loading import load_model
from model.modeling import ReplitForCausalLM
from model.tokenizer import ReplitTokenizer, load_tokenizer

__all__ = ["ReplitForCausalLM", "ReplitTokenizer", "load_model", "load_tokenizer"]
