"""The RLHF maths as pure tensor functions: trainers import them from here and never re-define them.

Shapes: B batch, T tokens, V vocabulary, P prompts, K completions per prompt. Log-probs in nats.
"""
from trainer.maths.advantages import gae, whiten_advantages
from trainer.maths.dpo import DPOLoss, dpo_loss
from trainer.maths.kl import (AdaptiveKLController, FixedKLController, kl_k1, kl_k3, kl_penalty, last_token_index,
                              per_token_rewards)
from trainer.maths.logprobs import next_token_logprobs, sequence_logprobs, token_logprobs
from trainer.maths.masked import masked_mean, masked_sum, masked_var, masked_whiten
from trainer.maths.ppo import PolicyLoss, PtxLoss, ValueLoss, entropy, policy_loss, ptx_loss, value_loss
from trainer.maths.ranking import pad_groups, pairwise_accuracy, pairwise_loss, ranking_loss

__all__ = [
    "AdaptiveKLController", "DPOLoss", "FixedKLController", "PolicyLoss", "PtxLoss", "ValueLoss", "dpo_loss",
    "entropy", "gae", "kl_k1", "kl_k3", "kl_penalty", "last_token_index", "masked_mean", "masked_sum",
    "masked_var", "masked_whiten", "next_token_logprobs", "pad_groups", "pairwise_accuracy", "pairwise_loss",
    "per_token_rewards", "policy_loss", "ptx_loss", "ranking_loss", "sequence_logprobs", "token_logprobs",
    "value_loss", "whiten_advantages",
]
