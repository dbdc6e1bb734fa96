import pytest

from rtsort.config import Config, DetectConfig, dump_config, load_config
from rtsort.errors import ConfigError


def test_toml_roundtrip(tmp_path):
    cfg = Config(detect=DetectConfig(threshold=3.0, polarity="both"))
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("[detect]\nthreshhold = 3.0\n", "unknown key(s) ['threshhold'] in [detect]"),
        ("[detct]\n", "unknown configuration table(s) ['detct']"),
        ("[detect]\npolarity = \"up\"\n", "detect.polarity must be one of"),
        ("[detect]\nthreshold = -1\n", "detect.threshold must be a finite number > 0, got -1.0"),
        ("[preprocess]\nfreq_min = 7000\n", "must be below preprocess.freq_max"),
        ("[snippets]\nn_channels = \"8\"\n", "snippets.n_channels must be int"),
        ("[detect\n", "invalid TOML"),
        ("[detect]\ncandidate_threshold = -2.0\n", "detect.candidate_threshold must be a finite number >= 0"),
        ("[assign]\ntemplate_candidates = 100\n", "assign.template_candidates must be an integer in [0, 64]"),
        ("[assign]\ntemplate_min_snr = -1.0\n", "assign.template_min_snr must be a finite number >= 0"),
        ("[assign]\ncandidate_max_residual = -1.0\n", "assign.candidate_max_residual must be a finite number >= 0"),
        ("[assign]\namplitude_prior = -0.5\n", "assign.amplitude_prior must be a finite number >= 0"),
        ("[cluster]\nselection = \"best\"\n", "cluster.selection must be 'eom' or 'leaf'"),
    ],
)
def test_bad_config_is_named(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
