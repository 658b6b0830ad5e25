"""Alerting: every alert is logged; with a webhook URL configured it is also POSTed as JSON
(Slack-compatible `text` field plus structured fields)."""

import logging
from typing import Any

import dagster as dg

log = logging.getLogger("mlops.alerts")


class AlertError(RuntimeError):
    pass


class AlertingResource(dg.ConfigurableResource):
    """`webhook_url` comes from MLOPS_ALERT_WEBHOOK_URL; empty means log only."""

    webhook_url: str = ""
    timeout_s: float = 5.0

    def alert(self, title: str, text: str, fields: dict[str, Any] | None = None) -> bool:
        """Log the alert; POST it when a webhook is set. Returns whether it was POSTed.
        A webhook that cannot be reached raises, so the failure shows on the sensor tick."""
        log.error("%s: %s %s", title, text, fields or {})
        if not self.webhook_url:
            return False
        import httpx

        body = {"text": f"{title}\n{text}", "title": title, "fields": fields or {}}
        try:
            r = httpx.post(self.webhook_url, json=body, timeout=self.timeout_s)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise AlertError(f"alert webhook {self.webhook_url} failed: {e}") from None
        return True
