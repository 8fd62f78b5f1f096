"""The transformer recommender: batches in (docs/data.md, Training input), one logit per shown item out.

One item embedding table serves the shown item and the history (the encoder fitted
them as one vocabulary). The history — items plus action types plus positions — goes
through pre-norm transformer layers with a padding mask; the shown item attends to the
encoded history (target attention); how often the shown item itself occurs in the
history, and how recently (the index of its latest occurrence), in all and per action
type, are given explicitly (target-match features, as in DIN: learning "same item"
through attention over fresh embeddings takes far more steps than a short run has);
the other categorical columns are embedded, the numeric ones projected; an MLP maps all
of it to one logit for BCE.

Memory grows linearly with the history length L: attention is PyTorch's
scaled_dot_product_attention, whose fused kernels never hold the [B, heads, L, L]
scores — FlashAttention for the CPU (a test checks it runs), the memory-efficient kernel
on CUDA (its flash kernel takes no mask; bench/gpu_check.sh prints which runs). Both need the attention weights themselves undropped (on the CPU,
attention dropout falls back to the math kernel, which holds [B, heads, L, L]), so
dropout acts on each sublayer's output instead.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTION_TYPES = 4  # 0 padding, 1 click, 2 add-to-cart, 3 order


class HistoryLayer(nn.Module):
    """A pre-norm transformer layer over the history: self-attention, then a feed-forward block."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attend):
        """x [B, L, dim]; attend [B, 1, 1, L], True where a key may be attended to."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        x = x + self.dropout(self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class Recommender(nn.Module):
    def __init__(self, item_vocabulary, categorical_vocabularies, numeric_features, max_history,
                 dim=64, heads=4, layers=2, dropout=0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.item_embedding = nn.Embedding(item_vocabulary, dim, padding_idx=0)
        self.action_embedding = nn.Embedding(ACTION_TYPES, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_history, dim)
        self.history_layers = nn.ModuleList(HistoryLayer(dim, heads, dropout) for _ in range(layers))
        self.history_norm = nn.LayerNorm(dim)
        self.target_query = nn.Linear(dim, dim)
        self.target_key_value = nn.Linear(dim, 2 * dim)
        self.target_out = nn.Linear(dim, dim)
        self.categorical_embeddings = nn.ModuleList(nn.Embedding(size, dim // 4) for size in categorical_vocabularies)
        self.numeric_projection = nn.Linear(numeric_features, dim // 2)
        width = 3 * dim + 2 * ACTION_TYPES + len(categorical_vocabularies) * (dim // 4) + dim // 2
        self.head = nn.Sequential(nn.Linear(width, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, 1))

    def forward(self, batch):
        history = batch["history_items"]
        positions = torch.arange(history.shape[1], device=history.device)
        sequence = (self.item_embedding(history) + self.action_embedding(batch["history_action_types"].long())
                    + self.position_embedding(positions)[None])
        attend = history != 0
        # An empty history would mask every key, and attention over nothing is NaN: let
        # such rows attend to their first (padding) slot, whose embedding carries no item.
        attend[:, 0] |= ~attend.any(dim=1)
        attend = attend[:, None, None, :]
        for layer in self.history_layers:
            sequence = layer(sequence, attend)
        encoded = self.history_norm(sequence)
        shown = self.item_embedding(batch["item"])
        attended = self._target_attention(shown, encoded, attend)
        # How often the shown item occurs in the history, and how recently (the index of its latest
        # occurrence, 0 the most recent action): in all and as each action type.
        same_item = (history == batch["item"][:, None]) & (history != 0)
        action_types = batch["history_action_types"].long()
        kinds = [same_item] + [same_item & (action_types == t) for t in range(1, ACTION_TYPES)]
        matches = torch.stack([kind.sum(1) for kind in kinds], dim=1)
        length = history.shape[1]
        latest = torch.stack([torch.where(kind, positions, length).amin(1) for kind in kinds], dim=1)
        recency = 1 - torch.log1p(latest.float()) / math.log1p(length)  # 1: the latest action, 0: none
        features = [shown, attended, shown * attended, torch.log1p(matches.float()), recency,
                    *(embedding(batch["categorical"][:, i]) for i, embedding in enumerate(self.categorical_embeddings)),
                    self.numeric_projection(batch["numeric"])]
        return self.head(torch.cat(features, dim=1)).squeeze(1)

    def _target_attention(self, shown, encoded, attend):
        """The shown item as the one query over the encoded history: [B, dim]."""
        batch_size, length, dim = encoded.shape
        query = self.target_query(shown).view(batch_size, self.heads, 1, -1)
        key, value = self.target_key_value(encoded).view(batch_size, length, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
        return self.target_out(attended.reshape(batch_size, dim))
