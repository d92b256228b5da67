"""The decoder's input token table: an ``nn.Embedding`` that mmwb.models.quantize knows to store as int8 rows.

A class of its own so that quantizing a whole VLM picks out exactly mmwb decoders' token tables (not towers'
position tables, not transformers' text models, which keep theirs); same parameters, names and results as
``nn.Embedding``.
"""

from __future__ import annotations

from torch import nn


class TokenEmbedding(nn.Embedding):
    pass
