"""Shared by the deploy tests: the service's metric contract."""

from __future__ import annotations

# The service's metric contract (names as exposed; histograms add _bucket/_sum/_count).
CONTRACT_METRICS = frozenset(
    {
        "aigc_time_to_first_token_seconds",
        "aigc_inter_token_latency_seconds",
        "aigc_e2e_request_latency_seconds",
        "aigc_request_queue_time_seconds",
        "aigc_image_batch_size",
        "aigc_num_requests_running",
        "aigc_num_requests_waiting",
        "aigc_kv_cache_usage_ratio",
        "aigc_model_load_seconds",
        "aigc_prompt_tokens_total",
        "aigc_generation_tokens_total",
        "aigc_request_success_total",
        "aigc_requests_rejected_total",
        "aigc_image_requests_total",
        "aigc_images_generated_total",
    }
)
