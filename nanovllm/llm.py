"""The offline API: `LLM(model).generate(prompts, sampling_params)`, `chat`, and `stream`."""
from collections.abc import Iterator, Sequence
from itertools import count

from tqdm.auto import tqdm

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.output import RequestOutput
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]
Params = SamplingParams | Sequence[SamplingParams] | None


class LLM:
    """An engine plus a loop. `model` is an HF folder or a .gguf file; "" loads the default model."""

    def __init__(self, model: str = "", **engine_args):
        self.engine = LLMEngine(model, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (also done at interpreter exit)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion and returns their outputs in prompt order."""
        request_ids = self._add(prompts, sampling_params, stream=False)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        finally:
            bar.close()
            self._abort_unfinished(request_ids, finished)
        return [finished[r] for r in request_ids]

    def stream(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params = None
               ) -> Iterator[RequestOutput]:
        """Yields a RequestOutput whenever a request progresses; `outputs[i].delta_text` is the new text."""
        request_ids = self._add(prompts, sampling_params)
        done: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                    yield output
        finally:
            self._abort_unfinished(request_ids, done)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: Params = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("This LLM has no tokenizer (skip_tokenizer_init), so it has no chat template.")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # The template already carries the special tokens; encoding must not add a second BOS.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _add(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params, stream: bool = True) -> list[str]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"Got {len(params)} sampling params for {len(prompts)} prompts.")
        # Validate everything before adding anything, so a bad prompt leaves nothing half-queued.
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                self.engine.process_prompt(prompt, p)
            except ValueError as e:
                raise ValueError(f"Prompt {i}: {e}") from None
        request_ids = [str(next(self._ids)) for _ in prompts]
        for request_id, prompt, p in zip(request_ids, prompts, params):
            self.engine.add_request(request_id, prompt, p, stream=stream)
        return request_ids

    def _abort_unfinished(self, request_ids: list[str], finished: dict) -> None:
        for request_id in request_ids:
            if request_id not in finished:
                self.engine.abort_request(request_id)
