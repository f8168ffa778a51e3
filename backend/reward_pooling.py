"""A BERT-family reward model that mean-pools the encoder's output into a linear score head.

Why not `AutoModelForSequenceClassification`: BERT's classification head reads the [CLS] token through the
pre-trained "pooler", and sentence encoders such as all-MiniLM-L6-v2 were trained with mean pooling -- their
[CLS] pooler was never trained for sentence meaning. Mean pooling starts the reward model from the features
the encoder was actually trained to produce.

Saved and loaded like any transformers model (`save_pretrained` / `from_pretrained`); its config names
`MEAN_POOL_ARCHITECTURE`, which is how `backend.reward_scoring` tells it from a plain classifier. Imported
lazily (torch, transformers) by the trainer and by `RewardModel.load`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MEAN_POOL_ARCHITECTURE = "BertMeanPoolForReward"
MEAN_POOL_MODEL_TYPES = ("bert",)  # bases this head fits; others keep their own classification head


class BertMeanPoolForReward(BertPreTrainedModel):
    """Encoder -> mean of the last hidden states over the attention mask -> dropout -> linear (num_labels).

    Same call and output shape as `BertForSequenceClassification` (`.logits`), so TRL's RewardTrainer trains
    it unchanged."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.score(self.dropout(pooled)))
