"""The network's math: pure Flax linen modules, no I/O.

  from model import get_preset, EncoderDecoder, DecoderLM
  cfg = get_preset('transformer_base', vocab_size=37000)
  logits = EncoderDecoder(cfg).apply(variables, inputs, targets)
"""

from model.config import TransformerConfig, config_from_dict, get_preset
from model.transformer import (Decoder, DecoderLM, Encoder, EncoderDecoder,
                               MaskedLM, init_cache, shift_right)
from model.heads import ScalarHead, ScalarLM

__all__ = [
    'TransformerConfig', 'config_from_dict', 'get_preset',
    'Encoder', 'Decoder', 'EncoderDecoder', 'DecoderLM', 'MaskedLM',
    'ScalarHead', 'ScalarLM', 'init_cache', 'shift_right',
]
