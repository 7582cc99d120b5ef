"""The fallback rollout engine: transformers `generate`, one prompt at a time.

Slower than vLLM but needs nothing beyond transformers. Each prompt samples its K responses together
(num_return_sequences) from an RNG seeded with derived_seed(sampling.seed, prompt.index), so a prompt's responses do
not depend on which other prompts share the call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM

from policy.config import PolicyConfig, RolloutConfig
from policy.rollout_protocol import Sampling
from policy.weight_sync import SyncGroup, SyncSpec
from rlhf_loop.common.hf_models import load_tokenizer, torch_dtype
from rlhf_loop.common.records import Prompt, Response, Rollout
from rlhf_loop.common.seeds import derived_seed


class HFEngine:
    """`rollout` and `seed` are taken for the common engine signature; sampling needs neither (per-prompt seeds)."""

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"HFEngine device must be cpu or cuda, got {device!r}")
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.policy = policy
        self.tokenizer = load_tokenizer(policy.tokenizer_source, policy.trust_remote_code)
        self.model = self._load_policy()
        self.eos_token_ids = _eos_token_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        self._sync_group: SyncGroup | None = None  # joined at the first sync, kept for the run

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        return [Rollout(prompt=prompt, responses=self._sample(prompt, sampling)) for prompt in prompts]

    def load_initial_weights(self) -> None:
        """pi_0 again, loaded from policy.model_path as a new engine loads it (a warm engine taken by a new run)."""
        del self.model  # before loading the new copy, so that the two never share the device
        self.model = self._load_policy()

    def _load_policy(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(
            self.policy.model_path,
            dtype=torch_dtype(self.policy.dtype, self.device.type),
            trust_remote_code=self.policy.trust_remote_code,
        ).to(self.device)
        return model.eval()

    @torch.inference_mode()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        result = self.model.load_state_dict(dict(named_tensors), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"update_weights got names the policy does not have: {result.unexpected_keys[:5]}")

    @torch.no_grad()
    def receive_weights(self, spec: SyncSpec, first_rank: int) -> None:
        """Take part in the learner's broadcast as rank `first_rank` of the group `spec.session` (joined once),
        copying each weight in as it arrives."""
        if self._sync_group is None or self._sync_group.spec.session != spec.session:
            self.release_weight_sync()
            self._sync_group = SyncGroup(spec, first_rank, self.device)
        params = dict(self.model.named_parameters())
        for name, tensor in self._sync_group.receive(spec.sync):
            if name not in params:
                raise ValueError(f"the learner sent {name!r}, which the policy does not have")
            params[name].copy_(tensor)

    def release_weight_sync(self) -> None:
        if self._sync_group is not None:
            self._sync_group.shutdown()
            self._sync_group = None

    @torch.inference_mode()
    def _sample(self, prompt: Prompt, sampling: Sampling) -> list[Response]:
        if len(prompt.token_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt {prompt.index} has {len(prompt.token_ids)} tokens; with max_tokens {sampling.max_tokens} "
                f"it exceeds max_model_len {self.max_model_len}"
            )
        input_ids = torch.tensor([prompt.token_ids], device=self.device)
        greedy = sampling.temperature == 0
        devices = [self.device] if self.device.type == "cuda" else []
        # fork_rng keeps the caller's global RNG untouched; generate samples from the global RNG.
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(derived_seed(sampling.seed, prompt.index))
            sequences = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=sampling.max_tokens,
                # Greedy decoding gives K identical responses: decode once, copy below.
                num_return_sequences=1 if greedy else sampling.n,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self._pad_token_id(),
                **_sampling_knobs(sampling),
            )
        responses = [self._response(row[len(prompt.token_ids) :].tolist()) for row in sequences]
        return responses * sampling.n if greedy else responses

    def _response(self, generated: list[int]) -> Response:
        """Cut the padding that follows the first EOS; keep the EOS itself, since DPO trains on it."""
        stop_at = next((i for i, token in enumerate(generated) if token in self.eos_token_ids), None)
        token_ids = generated if stop_at is None else generated[: stop_at + 1]
        return Response(
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            token_ids=token_ids,
            finish_reason="length" if stop_at is None else "stop",
        )

    def _pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_ids[0] if pad is None else pad


def _sampling_knobs(sampling: Sampling) -> dict:
    """Every knob set explicitly: generate fills unset ones from the checkpoint's generation_config.json (top_k=50,
    repetition penalties, ...), while vLLM samples with exactly the temperature and top_p given."""
    greedy = sampling.temperature == 0
    return dict(
        do_sample=not greedy,
        temperature=1.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=0,
        min_p=0.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
    )


def _eos_token_ids(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """The tokens that end a response: the generation config's, plus the tokenizer's (vLLM stops on both)."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)
    if not ids:
        raise ValueError("the policy has no EOS token in its tokenizer or generation config; set eos_token_id")
    return ids
