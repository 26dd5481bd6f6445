"""vLLM plugin entry point (``vllm.general_plugins``): registers DAM's attention backend.

vLLM calls :func:`register` with no arguments in every process it starts (the front end, the
engine core, each worker) before any model is built. It overrides the CPU platform's attention
backend (``CPU_ATTN``) by class path, so nothing of vLLM's attention code is imported here. The
backend (:mod:`dam.runtime.vllm_backend`) behaves exactly as vLLM's own unless an artifact is
given: ``--additional-config '{"dam_artifact": "PATH"}'`` (``LLM(...,
additional_config={"dam_artifact": PATH})``) or ``DAM_ARTIFACT=PATH``.

On GPU platforms nothing is registered yet: vLLM's own backends run (documented fallback).
"""

from __future__ import annotations

BACKEND = "dam.runtime.vllm_backend.DamCPUAttentionBackend"


def register() -> None:
    """Idempotent: make ``CPU_ATTN`` resolve to DAM's subclass of vLLM's CPU backend."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
