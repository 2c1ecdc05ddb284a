"""Linear attention with a diagonal decay, shared by the gla, retnet and rwkv mixers (not a mixer itself).

* :mod:`.ops`: the scan op ``linear_attn_scan`` (chunked reference, custom op, Triton
  backend registered) and its single-step form ``linear_attn_step``.
* :mod:`.layer`: :class:`~longhorn_zoo.plugins.linear_attention.layer.LinearAttention`, the module
  skeleton the three mixers share (features -> scan -> per-head norm and SiLU gate ->
  output projection), and the token shift used by RWKV.
* :mod:`.triton_chunk`: the Triton backend of the op.
"""
