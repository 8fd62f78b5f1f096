"""The transformer recommender (SPEC section 9's batches in, one logit per shown item out).

One item embedding table serves the shown item and the history (the encoder fitted
them as one vocabulary). The history — items plus action types plus positions — goes
through a transformer encoder with a padding mask; the shown item attends to the
encoded history (target attention); how often the shown item itself occurs in the
history, per action type, is counted explicitly (a target-match feature, as in DIN:
learning "same item" through attention over fresh embeddings takes far more steps
than a short run has); the other categorical columns are embedded, the numeric ones
projected; an MLP maps all of it to one logit for BCE.
"""

import torch
from torch import nn

ACTION_TYPES = 4  # 0 padding, 1 click, 2 add-to-cart, 3 order


class Recommender(nn.Module):
    def __init__(self, item_vocabulary, categorical_vocabularies, numeric_features, max_history,
                 dim=64, heads=4, layers=2, dropout=0.1):
        super().__init__()
        self.item_embedding = nn.Embedding(item_vocabulary, dim, padding_idx=0)
        self.action_embedding = nn.Embedding(ACTION_TYPES, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_history, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.history_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.target_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.categorical_embeddings = nn.ModuleList(nn.Embedding(size, dim // 4) for size in categorical_vocabularies)
        self.numeric_projection = nn.Linear(numeric_features, dim // 2)
        width = 3 * dim + ACTION_TYPES + len(categorical_vocabularies) * (dim // 4) + dim // 2
        self.head = nn.Sequential(nn.Linear(width, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, 1))

    def forward(self, batch):
        history = batch["history_items"]
        length = history.shape[1]
        positions = torch.arange(length, device=history.device)
        sequence = (self.item_embedding(history) + self.action_embedding(batch["history_action_types"].long())
                    + self.position_embedding(positions)[None])
        padding = history == 0
        # An empty history would mask every key, and attention over nothing is NaN: let
        # such rows attend to their first (padding) slot, whose embedding carries no item.
        padding[:, 0] &= ~padding.all(dim=1)
        encoded = self.history_encoder(sequence, src_key_padding_mask=padding)
        shown = self.item_embedding(batch["item"])
        attended, _ = self.target_attention(shown[:, None], encoded, encoded, key_padding_mask=padding)
        attended = attended[:, 0]
        # log1p of how often the shown item occurs in the history, in all and as each action type.
        same_item = (history == batch["item"][:, None]) & (history != 0)
        action_types = batch["history_action_types"].long()
        matches = torch.stack([same_item.sum(1)] + [(same_item & (action_types == t)).sum(1)
                                                    for t in range(1, ACTION_TYPES)], dim=1)
        features = [shown, attended, shown * attended, torch.log1p(matches.float()),
                    *(embedding(batch["categorical"][:, i]) for i, embedding in enumerate(self.categorical_embeddings)),
                    self.numeric_projection(batch["numeric"])]
        return self.head(torch.cat(features, dim=1)).squeeze(1)
