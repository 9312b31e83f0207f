"""The offline providers' public path; they live in :mod:`openrtc.agents.offline`."""

from openrtc.agents.offline import FIRST_QUESTION, OfflineLLM, ToneTTS, offline_reply

__all__ = ["FIRST_QUESTION", "OfflineLLM", "ToneTTS", "offline_reply"]
