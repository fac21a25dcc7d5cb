"""T5's decode step written out: the decoder's layers, one token a row, as plain tensor
operations on caches allocated once per batch.

The model's own forward pass does much at every decode step besides the answer's work: each
of the eight layers builds its attention masks again (a `where` over the position bias and
the padding), asks the cache classes for their lengths and layers, and goes through a dozen
modules' calls with their hooks and keyword arguments. On the benchmark's model answering 20
questions that was ~10 ms of a ~50 ms step (a pass 1.25x faster written out, the median of 6
alternated rounds). `T5Steps` does, per step, only what the answer depends on: the embedding
of the new tokens, per layer the three norms, the linear layers (the model's own modules, so a
LoRA adapter, packed weights and merged updates apply as they do in the model), attention by
SDPA to the self-attention cache and to the questions, the feed-forward block, and the output
layer. What stays the same for the whole batch is made once: the self-attention's position
bias for every position up to the cap (T5 shares the first layer's between the layers), the
masks over the questions and the cross-attention's keys and values, for each group of rows of
similar question length (`tokens.length_ranges`: a group attends to its own longest
question's keys only, as `decoding.grouped_key_attention` does, and its keys and values are
computed up to there). Within `decoding.packed_weights`, each layer's self-attention q, k and
v, and its gated feed-forward's two input layers, multiply as one product each
(`decoding.fused_product`: their packed weights laid end to end, the same sums).

Every operation is the one the model runs, on the same operands: the logits are the forward
pass's bit for bit (with several groups of questions, or on packed weights at a few rows,
up to float rounding), which `tests/test_decoding.py` checks at every step on T5 and mT5,
with the answers against `generate`'s. `written_steps_apply` says where the written steps
stand for the forward pass.
"""

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from finetune_module.engine.tokens import length_ranges, prefix_lengths

#: The families whose decoder `T5Steps` writes out (their blocks are T5's).
FAMILIES = frozenset({"t5", "mt5"})
#: The attention implementations whose decode-step attention is SDPA's, as `T5Steps` runs it.
SDPA_LIKE = frozenset({"sdpa", "sdpa_cheap_cpu_dropout", "sdpa_grouped_question_keys"})


def written_steps_apply(net: PreTrainedModel) -> bool:
    """Whether `T5Steps` computes `net`'s decode steps as its forward pass does: a T5 or mT5
    model in evaluation mode, float32, attending with SDPA (or this package's SDPA-based
    attentions), its feed-forward block T5's (gated or not), and its decoder's blocks laid out
    as T5's (self-attention, cross-attention, feed-forward)."""
    config = net.config
    if config.model_type not in FAMILIES or net.training:
        return False
    if config._attn_implementation not in SDPA_LIKE or net.dtype != torch.float32:
        return False
    decoder = getattr(net, "decoder", None)
    blocks = getattr(decoder, "block", None)
    if blocks is None or len(blocks) == 0:
        return False
    wanted = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    return all(
        len(block.layer) == 3
        and hasattr(block.layer[0], "SelfAttention")
        and hasattr(block.layer[1], "EncDecAttention")
        and all(hasattr(block.layer[2].DenseReluDense, name) for name in wanted)
        for block in blocks
    )


def _norm(hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """`T5LayerNorm`'s forward (float32): the root-mean-square norm, scaled by its weight."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return norm.weight * (hidden * torch.rsqrt(variance + norm.variance_epsilon))


#: Makes one product of linear layers that read the same input (their outputs side by side),
#: or None where they cannot be one (`decoding.fused_product`).
Fuse = Callable[[Sequence[torch.nn.Module]], Callable[[torch.Tensor], torch.Tensor] | None]


class T5Steps:
    """A T5 model's decode steps for one batch of questions (`written_steps_apply`): call it
    with each step's tokens (one a row) to get the logits of the next; `keep` drops the rows
    that have ended, `reorder` follows beam search's beams. Make it, and call it, under
    `torch.inference_mode()`."""

    def __init__(
        self,
        net: PreTrainedModel,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor,
        capacity: int,
        fuse: Fuse | None = None,
        beams: int = 1,
    ) -> None:
        """`encoder_states` (questions x their length x width) and `attention_mask`
        (questions x length, right padding) are the questions as the encoder read them;
        `capacity` is the most tokens a row's decoder sequence will hold (the decoder start
        included). Where `fuse` makes one product of each layer's self-attention q, k and v,
        and of its feed-forward's two input layers (gated), those run as one. With `beams`,
        every question is that many rows in a row (beam search's beams), which attend to
        their question's keys and values together, read once for all of them."""
        config = net.config
        self.net = net
        self.beams = beams
        self.heads, self.key_width = config.num_heads, config.d_kv
        self.blocks = [block.layer for block in net.decoder.block]
        self.embed = net.decoder.embed_tokens
        self.final_norm = net.decoder.final_layer_norm
        # T5 scales its output by the width where its output layer is the embedding (mT5 does not)
        scaled = getattr(config, "scale_decoder_outputs", False)
        self.output_scale = config.d_model**-0.5 if scaled else None
        self.fused = [_fused_layers(layers, fuse) for layers in self.blocks]
        first = self.blocks[0][0].SelfAttention
        # the self-attention's position bias, (1, heads, query position, key position)
        self.bias = first.compute_bias(capacity, capacity, device=encoder_states.device)
        self.length = 0
        rows = encoder_states.shape[0] * beams
        shape = (rows, self.heads, capacity, self.key_width)
        self.self_keys = [encoder_states.new_empty(shape) for _ in self.blocks]
        self.self_values = [encoder_states.new_empty(shape) for _ in self.blocks]
        lengths = prefix_lengths(attention_mask)
        if lengths is None:
            raise ValueError("the questions' attention mask is not right padding")
        self.question_lengths = lengths.tolist()
        self.dtype, self.device = encoder_states.dtype, encoder_states.device
        self._group()
        # the cross-attention's keys and values, computed group by group up to the group's
        # longest question (zero past it: masked, and never read by the group)
        self.cross_keys, self.cross_values = [], []
        shape = (encoder_states.shape[0], self.heads, encoder_states.shape[1], self.key_width)
        for layers in self.blocks:
            attention = layers[1].EncDecAttention
            keys, values = encoder_states.new_zeros(shape), encoder_states.new_zeros(shape)
            for start, end, length, _ in self.groups:
                states = encoder_states[start:end, :length]
                keys[start:end, :, :length] = self._heads(attention.k(states))
                values[start:end, :, :length] = self._heads(attention.v(states))
            self.cross_keys.append(keys)
            self.cross_values.append(values)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """A linear layer's output (rows x length x heads * key width) as attention reads it:
        rows x heads x length x key width (a view, as the model's `view` and `transpose`)."""
        return states.view(*states.shape[:2], self.heads, self.key_width).transpose(1, 2)

    def _group(self) -> None:
        """The questions' groups of similar length (`tokens.length_ranges`; all of them as
        one where they are not in order of length), each a range of questions with the keys it
        attends to and its additive mask over them: 0 on a question's tokens and the float's
        least value past them, a row per head, as the model's SDPA mask holds them."""
        lengths = self.question_lengths
        groups = length_ranges(lengths) or [(0, len(lengths), max(lengths))]
        least = torch.finfo(self.dtype).min
        self.groups = []
        for start, end, keys in groups:
            positions = torch.arange(keys, device=self.device)
            inside = (
                positions[None, :] < torch.tensor(lengths[start:end], device=self.device)[:, None]
            )
            mask = torch.where(inside, 0.0, least).to(self.dtype)
            mask = mask[:, None, None, :].expand(-1, self.heads, 1, -1).contiguous()
            self.groups.append((start, end, keys, mask))

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only the rows `rows` (indices of the rows still in the batch; with beams,
        every beam of the questions kept, in order)."""
        self.self_keys = [keys[rows] for keys in self.self_keys]
        self.self_values = [values[rows] for values in self.self_values]
        questions = rows[:: self.beams] // self.beams
        self.cross_keys = [keys[questions] for keys in self.cross_keys]
        self.cross_values = [values[questions] for values in self.cross_values]
        self.question_lengths = [self.question_lengths[q] for q in questions.tolist()]
        self._group()

    def reorder(self, rows: torch.Tensor) -> None:
        """Puts the self-attention caches of the tokens so far in the order `rows` (for each
        row, the row it continues: beam search's beams, each continuing a beam of its own
        question, so that the questions' keys and values stay as they are). Only the rows
        that take another row's tokens are copied."""
        moved = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)
        if len(moved) == 0:
            return
        held, sources = slice(0, self.length), rows[moved]
        for keys, values in zip(self.self_keys, self.self_values, strict=True):
            keys[moved, :, held] = keys[sources, :, held]
            values[moved, :, held] = values[sources, :, held]

    def _cross_attention(self, query: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of each row's query (rows x heads x 1 x key width) to its questions'
        keys, group by group; with beams, a question's beams' queries together (questions x
        heads x beams x key width)."""
        if self.beams == 1:
            return self._question_attention(query, layer)
        rows, heads, _, width = query.shape
        together = query.view(rows // self.beams, self.beams, heads, width).transpose(1, 2)
        out = self._question_attention(together, layer)
        return out.transpose(1, 2).reshape(rows, heads, 1, width)

    def _question_attention(self, query: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of each question's queries (questions x heads x queries x key width) to
        its keys, group by group."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        keys, values = self.cross_keys[layer], self.cross_values[layer]
        if len(self.groups) == 1:
            _, _, length, mask = self.groups[0]
            return sdpa(
                query, keys[:, :, :length], values[:, :, :length], attn_mask=mask, scale=1.0
            )
        out = query.new_empty(query.shape)
        for start, end, length, mask in self.groups:
            out[start:end] = sdpa(
                query[start:end],
                keys[start:end, :, :length],
                values[start:end, :, :length],
                attn_mask=mask,
                scale=1.0,
            )
        return out

    def _cached(
        self, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes a layer's keys and values of the tokens at `position` (rows x heads x 1 x
        key width) into its self-attention cache; returns the cache's keys and values up to
        them (views)."""
        end = position + 1
        self.self_keys[layer][:, :, position:end].copy_(keys)
        self.self_values[layer][:, :, position:end].copy_(values)
        return self.self_keys[layer][:, :, :end], self.self_values[layer][:, :, :end]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits (rows x vocabulary) of the token after `tokens` (one a row), which
        stand at the next position of each row's decoder sequence."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        rows, position = tokens.shape[0], self.length
        seen = position + 1
        hidden = self.embed(tokens)
        bias = self.bias[:, :, position : position + 1, :seen].contiguous()
        inner = self.heads * self.key_width

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(rows, 1, self.heads, self.key_width).transpose(1, 2)

        for layer, (self_part, cross_part, feed_forward) in enumerate(self.blocks):
            attention = self_part.SelfAttention
            together, gate = self.fused[layer]
            normed = _norm(hidden, self_part.layer_norm)
            if together is not None:
                query, key, value = together(normed).split(inner, dim=-1)
            else:
                query, key, value = attention.q(normed), attention.k(normed), attention.v(normed)
            keys, values = self._cached(layer, position, heads(key), heads(value))
            out = sdpa(heads(query), keys, values, attn_mask=bias, scale=1.0)
            hidden = hidden + attention.o(out.transpose(1, 2).reshape(rows, inner))

            attention = cross_part.EncDecAttention
            normed = _norm(hidden, cross_part.layer_norm)
            out = self._cross_attention(heads(attention.q(normed)), layer)
            hidden = hidden + attention.o(out.transpose(1, 2).reshape(rows, inner))

            block = feed_forward.DenseReluDense
            normed = _norm(hidden, feed_forward.layer_norm)
            if gate is not None:
                first, second = gate(normed).split(block.wi_0.out_features, dim=-1)
                inside = block.act(first) * second
            elif hasattr(block, "wi_0"):
                inside = block.act(block.wi_0(normed)) * block.wi_1(normed)
            else:
                inside = block.act(block.wi(normed))
            hidden = hidden + block.wo(inside)
        self.length = seen
        hidden = _norm(hidden, self.final_norm)
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return self.net.lm_head(hidden)


def _fused_layers(
    layers: torch.nn.ModuleList, fuse: Fuse | None
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, ...]:
    """A decoder block's products that `fuse` makes one: its self-attention's q, k and v, and
    its gated feed-forward's two input layers (each None where not)."""
    if fuse is None:
        return None, None
    attention, block = layers[0].SelfAttention, layers[2].DenseReluDense
    gate = fuse([block.wi_0, block.wi_1]) if hasattr(block, "wi_0") else None
    return fuse([attention.q, attention.k, attention.v]), gate


def written_steps(
    net: PreTrainedModel,
    encoder_states: torch.Tensor,
    attention_mask: torch.Tensor,
    capacity: int,
    fuse: Fuse | None = None,
    beams: int = 1,
) -> T5Steps | None:
    """`T5Steps` for a batch of questions (as `T5Steps` takes them) where
    `written_steps_apply` to `net`; else None (the forward pass runs the steps)."""
    if not written_steps_apply(net):
        return None
    return T5Steps(net, encoder_states, attention_mask, capacity, fuse, beams)
