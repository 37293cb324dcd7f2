"""What litellm says goes on the wire for one request: URL, headers, body — and nothing after that.

litellm stays the provider layer (which provider a model id means, its URL and auth headers, how
OpenAI parameters map to it, which models need the Responses API); Switchyard sends the request
and reads the answer itself, so no per-chunk object is ever built. The litellm entry points used
here, and why they are stable enough to depend on, are listed in docs/decisions.md (entries 50, 101):

  litellm.get_llm_provider                      model id -> (model, provider, key, base)
  litellm.utils.ProviderConfigManager           provider -> its chat / Responses config object
  litellm.utils.get_optional_params             OpenAI params -> the provider's (drop_params, renames)
  <chat config>.validate_environment / get_complete_url / transform_request
  litellm.responses.bridge_check.responses_api_bridge_check     does this request need /responses?
  LiteLLMResponsesTransformationHandler.transform_request       chat request -> Responses request
  litellm.responses.utils.ResponsesAPIRequestUtils              Responses params, as aresponses() maps them
  <responses config>.validate_environment / get_complete_url / transform_responses_api_request
  ProviderConfigManager.get_provider_anthropic_messages_config   Anthropic -> its Messages config
  <messages config>.validate_anthropic_messages_environment / get_complete_url /
      transform_anthropic_messages_request                      a Messages request as Anthropic gets it

Four modes: `chat` (the provider speaks OpenAI chat completions: relay its bytes), `responses`
(translate each Responses event, responses_sse.py), `messages` (a Messages caller and a provider that
speaks Messages itself, Anthropic: relay its bytes) and `litellm` (anything else, e.g. a chat caller
and Anthropic: litellm.acompletion end to end, at litellm's per-chunk cost).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import LiteLLMBackend as LiteLLMConfig

Mode = Literal["chat", "responses", "messages", "litellm"]

# Providers whose chat endpoint is OpenAI's wire format (their litellm config subclasses
# OpenAIGPTConfig and litellm itself sends them through the OpenAI SDK or an OpenAI-shaped POST).
_OPENAI_WIRE = {"openai", "custom_openai", "openai_like", "hosted_vllm", "lm_studio", "llamafile", "litellm_proxy"}
# get_optional_params' own arguments that a client body must not set.
_NOT_FROM_CLIENT = {"model", "custom_llm_provider", "drop_params", "allowed_openai_params", "additional_drop_params",
                    "messages", "base_model", "model_info", "api_version", "extra_headers", "max_retries", "kwargs"}
_BODY_OWN = {"model", "messages", "stream", "stream_options"}


@dataclass(slots=True)
class WireRequest:
    mode: Mode
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    model: str = ""  # the provider's own model id
    include_usage: bool = False  # the client asked for the usage chunk


class ProviderWire:
    """Resolved once per backend; `build` is called once per request."""

    def __init__(self, litellm: Any, cfg: LiteLLMConfig) -> None:
        from litellm.llms.openai.chat.gpt_transformation import OpenAIGPTConfig
        from litellm.types.utils import LlmProviders
        from litellm.utils import ProviderConfigManager, get_optional_params

        self._litellm = litellm
        self._get_optional_params = get_optional_params
        model, provider, dyn_key, dyn_base = litellm.get_llm_provider(cfg.model, api_base=cfg.api_base,
                                                                      api_key=cfg.api_key)
        self.model, self.provider = model, provider
        self.api_base: str | None = cfg.api_base or dyn_base
        try:
            self.chat_config = ProviderConfigManager.get_provider_chat_config(model=model,
                                                                             provider=LlmProviders(provider))
        except (ValueError, KeyError):  # a provider litellm handles only inside completion(): not relayed
            self.chat_config = None
        getter = getattr(self.chat_config, "get_api_key", None)
        self.api_key: str | None = cfg.api_key or dyn_key or (getter() if callable(getter) else None)
        if provider == "openai" and self.api_base is None:
            self.api_base = OpenAIGPTConfig.get_api_base()
        # Relay only where litellm knows the provider speaks OpenAI chat and where it is (some providers'
        # default URL lives in litellm's main.py, not in their config: those go through litellm).
        self.relays = (isinstance(self.chat_config, OpenAIGPTConfig) and self.api_base is not None
                       and (provider in _OPENAI_WIRE or provider in litellm.openai_compatible_providers))
        named = set(inspect.signature(get_optional_params).parameters)
        self._named = named - _NOT_FROM_CLIENT
        self._manager = ProviderConfigManager
        self._providers = LlmProviders

    # ---- per request ----------------------------------------------------------------------------

    def _litellm_params(self) -> dict[str, Any]:
        return {"custom_llm_provider": self.provider, "drop_params": True, "api_base": self.api_base,
                "api_key": self.api_key}

    def _optional(self, model: str, body: dict[str, Any], stream: bool, bridged: bool) -> dict[str, Any]:
        named: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in body.items():
            if k in _BODY_OWN:
                continue
            (named if k in self._named else extra)[k] = v
        stream_options = (body.get("stream_options") or {"include_usage": True}) if stream else None
        return self._get_optional_params(
            model=model, custom_llm_provider=self.provider, stream=stream, stream_options=stream_options,
            drop_params=True,  # a field this provider lacks (e.g. temperature for gpt-5) is dropped, not an error
            messages=body["messages"], allowed_openai_params=["reasoning_effort"] if bridged else None,
            **named, **extra)

    def mode_for(self, body: dict[str, Any]) -> tuple[Mode, str]:
        from litellm.responses.bridge_check import responses_api_bridge_check

        info, model = responses_api_bridge_check(model=self.model, custom_llm_provider=self.provider,
                                                 tools=body.get("tools"), reasoning_effort=body.get("reasoning_effort"),
                                                 api_base=self.api_base)
        if info.get("mode") == "responses" and self.api_base is not None:
            if self._manager.get_provider_responses_api_config(provider=self.provider, model=model) is not None:
                return "responses", model
            return "litellm", model
        return ("chat" if self.relays else "litellm"), model

    def build(self, body: dict[str, Any], extra_headers: dict[str, str], stream: bool) -> WireRequest:
        mode, model = self.mode_for(body)
        include_usage = bool(stream and (body.get("stream_options") or {}).get("include_usage"))
        if mode == "chat":
            return self._chat(model, body, extra_headers, stream, include_usage)
        if mode == "responses":
            return self._responses(model, body, extra_headers, stream, include_usage)
        return WireRequest("litellm", model=model, include_usage=include_usage)

    def messages(self, body: dict[str, Any], extra_headers: dict[str, str], stream: bool) -> WireRequest | None:
        """A Messages request to a provider that speaks Messages itself (Anthropic), as litellm would send
        it (URL, auth and version headers, its parameter rules); None for any other provider, which
        goes through litellm's adapter (hosted_protocols.py). litellm's own streaming path for this
        case needs its proxy's extras (redis, ...), which are not installed: streamed Messages to an
        `anthropic/*` model failed before this relay."""
        if self.provider != "anthropic":
            return None
        from litellm.types.router import GenericLiteLLMParams

        cfg = self._manager.get_provider_anthropic_messages_config(model=self.model,
                                                                  provider=self._providers(self.provider))
        if cfg is None:
            return None
        optional = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
        lp = {"api_base": self.api_base, "api_key": self.api_key, "drop_params": True}
        headers, api_base = cfg.validate_anthropic_messages_environment(
            headers=dict(extra_headers), model=self.model, messages=body["messages"], optional_params=optional,
            litellm_params=lp, api_key=self.api_key, api_base=self.api_base)
        url = cfg.get_complete_url(api_base, self.api_key, self.model, optional, lp, stream=stream)
        data = dict(cfg.transform_anthropic_messages_request(
            model=self.model, messages=body["messages"], anthropic_messages_optional_request_params=optional,
            litellm_params=GenericLiteLLMParams(**lp), headers=headers))
        data["stream"] = stream
        return WireRequest("messages", url, headers, json.dumps(data).encode(), self.model)

    def _chat(self, model: str, body: dict[str, Any], extra_headers: dict[str, str], stream: bool,
              include_usage: bool) -> WireRequest:
        cfg = self.chat_config
        lp = self._litellm_params()
        optional = self._optional(model, body, stream, bridged=False)
        headers = cfg.validate_environment({}, model, body["messages"], optional, lp, api_key=self.api_key,
                                           api_base=self.api_base)
        url = cfg.get_complete_url(self.api_base, self.api_key, model, optional, lp, stream=stream)
        data = cfg.transform_request(model, body["messages"], optional, lp, headers)
        extra = data.pop("extra_body", None)
        if isinstance(extra, dict):
            data.update(extra)  # what the OpenAI SDK does with extra_body: merged at the top level
        data["stream"] = stream
        headers = {**headers, **extra_headers}
        return WireRequest("chat", url, headers, json.dumps(data).encode(), model, include_usage)

    def _responses(self, model: str, body: dict[str, Any], extra_headers: dict[str, str], stream: bool,
                   include_usage: bool) -> WireRequest:
        from litellm.completion_extras.litellm_responses_transformation.transformation import (
            LiteLLMResponsesTransformationHandler,
        )
        from litellm.responses.utils import ResponsesAPIRequestUtils
        from litellm.types.router import GenericLiteLLMParams

        rcfg = self._manager.get_provider_responses_api_config(provider=self.provider, model=model)
        lp = self._litellm_params()
        optional = self._optional(model, body, stream, bridged=True)
        request = LiteLLMResponsesTransformationHandler().transform_request(
            model, body["messages"], optional, lp, {}, litellm_logging_obj=None)
        items = request.pop("input")
        wanted = ResponsesAPIRequestUtils.get_requested_response_api_optional_param(dict(request))
        params = ResponsesAPIRequestUtils.get_optional_params_responses_api(
            model=model, responses_api_provider_config=rcfg, response_api_optional_params=wanted, drop_params=True)
        glp = GenericLiteLLMParams(api_base=self.api_base, api_key=self.api_key, drop_params=True)
        headers = rcfg.validate_environment(headers=dict(extra_headers), model=model, litellm_params=glp)
        url = rcfg.get_complete_url(api_base=self.api_base, litellm_params=dict(glp))
        data = rcfg.transform_responses_api_request(model=model, input=items, litellm_params=glp, headers=headers,
                                                    response_api_optional_request_params=params)
        data = dict(data)
        if stream:
            data["stream"] = True
        else:
            data.pop("stream", None)
        return WireRequest("responses", url, {**headers, **extra_headers}, json.dumps(data).encode(), model,
                           include_usage)
