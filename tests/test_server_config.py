"""Settings come from environment variables, with defaults and errors naming the variable."""
from __future__ import annotations

from pathlib import Path

import pytest

from backend.config import Settings
from model.predictor import DEFAULT_CHECKPOINT


def test_defaults_serve_the_embedded_checkpoint():
    settings = Settings.from_env({})
    assert settings.checkpoint == DEFAULT_CHECKPOINT
    assert (settings.device, settings.cfr_steps, settings.workers, settings.threads) == ("auto", 2, 1, 16)
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 9090, "INFO")
    assert settings.session_cache_bytes == 1 << 30 and not settings.auth_enabled
    assert settings.image_access.max_image_pixels == 50_000_000
    assert settings.click_refinement is None  # the predictor's default
    assert settings.clicked_components_only


def test_every_variable_is_read(tmp_path):
    settings = Settings.from_env({
        "MODEL_DIR": str(tmp_path), "CHECKPOINT": "tuned.safetensors", "DEVICE": "cuda:1", "CFR_STEPS": "0", "CLICK_REFINEMENT": "5",
        "CLICKED_COMPONENTS_ONLY": "false",
        "WORKERS": "3", "THREADS": "8", "LOG_LEVEL": "debug", "HOST": "127.0.0.1", "PORT": "8000",
        "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw", "SESSION_CACHE_BYTES": "1000",
        "LABEL_STUDIO_URL": "http://label-studio:8080", "LABEL_STUDIO_API_KEY": "k",
        "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "ALLOWED_IMAGE_HOSTS": "a.example.com,b.example.com:8443",
        "MAX_IMAGE_PIXELS": "1000000", "MAX_IMAGE_BYTES": "2000000",
    })
    assert settings.checkpoint == tmp_path / "tuned.safetensors"  # relative to MODEL_DIR
    assert (settings.device, settings.cfr_steps, settings.workers, settings.threads) == ("cuda:1", 0, 3, 8)
    assert settings.click_refinement == 5
    assert settings.predictor_options() == {"device": "cuda:1", "cfr_steps": 0, "click_refinement_iterations": 5,
                                            "clicked_components_only": False}
    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.1", 8000, "DEBUG")
    assert settings.auth_enabled and settings.session_cache_bytes == 1000
    access = settings.image_access
    assert access.label_studio_url == "http://label-studio:8080" and access.api_key == "k"
    assert access.allowed_image_hosts == ("a.example.com", "b.example.com:8443")
    assert (access.max_image_pixels, access.max_download_bytes) == (1_000_000, 2_000_000)


def test_an_absolute_checkpoint_ignores_model_dir(tmp_path):
    settings = Settings.from_env({"MODEL_DIR": "/elsewhere", "CHECKPOINT": str(tmp_path / "x.safetensors")})
    assert settings.checkpoint == Path(tmp_path / "x.safetensors")


@pytest.mark.parametrize("env, fragment", [
    ({"CFR_STEPS": "two"}, "CFR_STEPS='two' is not an integer"),
    ({"WORKERS": "0"}, "WORKERS=0 must be at least 1"),
    ({"CLICK_REFINEMENT": "-1"}, "CLICK_REFINEMENT=-1 must be at least 0"),
    ({"CLICKED_COMPONENTS_ONLY": "maybe"}, "CLICKED_COMPONENTS_ONLY='maybe' is not a boolean"),
    ({"PORT": "-1"}, "PORT=-1"),
    ({"DEVICE": "tpu"}, "DEVICE='tpu'"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD'"),
    ({"BASIC_AUTH_PASS": "pw"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS"),
    ({"MAX_IMAGE_PIXELS": "lots"}, "MAX_IMAGE_PIXELS"),
])
def test_bad_values_name_the_variable(env, fragment):
    with pytest.raises(ValueError) as info:
        Settings.from_env(env)
    assert fragment in str(info.value)


def test_click_refinement_on_a_network_without_it_is_a_503_naming_the_variable(tmp_path):
    from backend.errors import BackendError
    from backend.service import ClickSegModel
    from model.checkpoint import save_checkpoint
    from model.nets.registry import create_model

    net = create_model("plainvit", {"input_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2,
                                    "neck_out_dims": [8, 8, 8, 8], "head_channels": 8})
    save_checkpoint(net, tmp_path / "vit.safetensors")
    env = {"MODEL_DIR": str(tmp_path), "CHECKPOINT": "vit.safetensors", "DEVICE": "cpu"}
    model = ClickSegModel(Settings.from_env({**env, "CLICK_REFINEMENT": "3"}))
    with pytest.raises(BackendError) as info:
        model.predictor
    assert info.value.status == 503
    assert "CLICK_REFINEMENT=3" in str(info.value) and "no decoder_features" in str(info.value)
    assert ClickSegModel(Settings.from_env(env)).predictor.click_refinement_iterations == 0  # unset: off for it
