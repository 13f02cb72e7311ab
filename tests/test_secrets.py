"""Credentials never reach a log line, an error message or a repr, whatever the URL looks like."""

import logging
import os

import pytest
import torch

from rcllm_sdk.cache import open_store
from rcllm_sdk.cache.base import redact_url
from rcllm_sdk.cache.local_servers import free_port
from rcllm_sdk.errors import ConfigError, FeatureRepoError
from rcllm_sdk.features.store import online_store_yaml

SECRET = "s3cr/et@pa:ss"
OPENABLE_SECRET = "s3cr@et:pa"  # a "/" in a password cannot be parsed out of a URL at all


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("redis://user:pw@h:6379/0", "redis://***@h:6379/0"),
        ("REDIS://user:pw@h:6379", "REDIS://***@h:6379"),
        (f"rediss://rcllm:{SECRET}@10.0.0.2:6380/1", "rediss://***@10.0.0.2:6380/1"),
        (
            f"Error connecting to 'redis://:{SECRET}@h:1'. refused",
            "Error connecting to 'redis://***@h:1'. refused",
        ),
        ("lm://127.0.0.1:65432 and fs:///tmp/x", "lm://127.0.0.1:65432 and fs:///tmp/x"),
    ],
)
def test_one_redaction_covers_any_scheme_case_and_any_password(text, redacted):
    assert redact_url(text) == redacted


def test_an_upper_case_scheme_opens_the_store_it_names_and_never_prints_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    url = f"REDIS://rcllm:{OPENABLE_SECRET}@127.0.0.1:{free_port()}"
    with open_store(url, "m", max_local_cpu_gb=0.03, timeout_s=0.5) as store:
        assert store.url.startswith("redis://***@")
        store.put(1, torch.zeros(2, 1, 2, 4))
        assert store.get(1) is None and store.stats.errors >= 1  # nothing listens: counted, not raised
        assert OPENABLE_SECRET not in repr(store)
    assert caplog.records and not [r for r in caplog.records if OPENABLE_SECRET in r.getMessage()]


def test_a_url_whose_password_holds_a_slash_is_refused_without_printing_it():
    with pytest.raises(ConfigError) as error:
        open_store(f"redis://u:{SECRET}@127.0.0.1:1", "m")
    assert SECRET not in str(error.value) and "***" in str(error.value)


def test_a_password_with_a_comma_is_refused_without_printing_it():
    with pytest.raises(ConfigError) as error:
        open_store("redis://u:a,b@127.0.0.1:1", "m")
    assert "a,b" not in str(error.value)


@pytest.mark.parametrize("path", ["a,b", "a b", "x, y"])
def test_an_fs_directory_that_lmcache_would_split_is_refused(tmp_path, path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="separator"):
        open_store(f"fs://{tmp_path}/{path}", "m")
    assert os.listdir(tmp_path) == []


def test_the_online_store_accepts_any_scheme_case_and_redacts_what_it_refuses():
    yaml = online_store_yaml("REDIS://u:s3cr3t@h:6379")
    assert 'connection_string: "h:6379,username=u,password=${RCLLM_ONLINE_STORE_PASSWORD}"' in yaml
    assert "s3cr3t" not in yaml
    with pytest.raises(FeatureRepoError) as error:
        online_store_yaml(f"memcached://u:{SECRET}@h:1")
    assert SECRET not in str(error.value)
