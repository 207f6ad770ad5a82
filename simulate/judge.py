"""A simulated user's judgement: a preference rule plus label noise.

Label noise models a person's mistakes between answers they *can* tell apart:
- comparison: a decided verdict (a or b) is reversed with probability `noise`. A tie (equal
  scores) stays a tie and is never flipped: a person who sees no difference says so, and reversing
  a tie means nothing. So the observed flip rate is `noise` over decided comparisons only.
- ranking: the rule's order (best first; equal scores in random order, since a ranking has no
  ties) gets, with probability `noise`, one random adjacent pair swapped.
- rating: +1 if the score is above `threshold`, else -1; reversed with probability `noise`.

Everything random comes from the `random.Random` handed in, so a seeded user judges reproducibly.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from simulate.rules import PreferenceRule, RuleError


@dataclass(frozen=True)
class ComparisonVerdict:
    rule_winner: str  # "a" | "b" | "tie": what the rule says
    winner: str       # what is sent (after noise)
    scores: tuple[float, float]

    @property
    def flipped(self) -> bool:
        return self.winner != self.rule_winner

    @property
    def decided(self) -> bool:
        return self.rule_winner != "tie"


@dataclass(frozen=True)
class RankingVerdict:
    order: list[int]       # indices into the answers, best first, as sent
    rule_order: list[int]  # the rule's order before noise (equal scores in random order)
    scores: list[float]
    flipped: bool     # a noise swap was applied

    @property
    def agrees(self) -> bool:
        """The sent order never puts a lower-scored answer above a higher one (a swap of two
        equally scored answers still agrees with the rule)."""
        ranked = [self.scores[i] for i in self.order]
        return all(x >= y for x, y in zip(ranked, ranked[1:]))


@dataclass(frozen=True)
class RatingVerdict:
    rule_score: int  # +1 | -1
    score: int       # sent
    value: float

    @property
    def flipped(self) -> bool:
        return self.score != self.rule_score


class Judge:
    def __init__(self, rule: PreferenceRule, noise: float, rng: random.Random, threshold: float = 0.0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be between 0 and 1, got {noise}")
        self.rule, self.noise, self.rng, self.threshold = rule, noise, rng, threshold

    def score(self, prompt: str, answer: str) -> float:
        try:
            value = float(self.rule(prompt, answer))
        except Exception as exc:  # the user's rule is code we do not control: say what it did
            raise RuleError(f"the rule raised {type(exc).__name__}: {exc}") from exc
        if math.isnan(value):
            raise RuleError("the rule returned NaN")
        return value

    def _noisy(self) -> bool:
        return self.noise > 0 and self.rng.random() < self.noise

    def compare(self, prompt: str, a: str, b: str) -> ComparisonVerdict:
        sa, sb = self.score(prompt, a), self.score(prompt, b)
        rule_winner = "a" if sa > sb else "b" if sb > sa else "tie"
        winner = rule_winner
        if rule_winner != "tie" and self._noisy():
            winner = "b" if rule_winner == "a" else "a"
        return ComparisonVerdict(rule_winner, winner, (sa, sb))

    def rank(self, prompt: str, answers: list[str]) -> RankingVerdict:
        scores = [self.score(prompt, answer) for answer in answers]
        order = list(range(len(answers)))
        self.rng.shuffle(order)  # equal scores end up in random order (the sort below is stable)
        order.sort(key=lambda i: -scores[i])
        rule_order = list(order)
        flipped = len(order) > 1 and self._noisy()
        if flipped:
            i = self.rng.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        return RankingVerdict(order, rule_order, scores, flipped)

    def rate(self, prompt: str, answer: str) -> RatingVerdict:
        value = self.score(prompt, answer)
        rule_score = 1 if value > self.threshold else -1
        score = -rule_score if self._noisy() else rule_score
        return RatingVerdict(rule_score, score, value)
