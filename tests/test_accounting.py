"""Tests for dpjax/accounting.py and the dpjax-privacy command."""

import math

import dp_accounting
import pytest

from dpjax import accounting
from dpjax import privacy_cli

# ../shared/docs/ANCHORS.md, dp_accounting 0.6.0, delta = 1e-5.
REFERENCE = [
    # (q, sigma, steps, rdp, pld)
    (256 / 60000, 1.1, 14062, 2.597, 2.382),
    (256 / 60000, 1.1, 3515, 1.281, 1.134),
    (4096 / 50000, 3.0, 2500, 7.10, 6.58),
]


@pytest.mark.parametrize('q,sigma,steps,rdp,pld', REFERENCE)
def test_reference_epsilons(q, sigma, steps, rdp, pld):
  event = accounting.dpsgd_event(sigma, q, steps)
  assert accounting.epsilon(event, 1e-5, 'rdp') == pytest.approx(rdp, rel=5e-3)
  assert accounting.epsilon(event, 1e-5, 'pld') == pytest.approx(pld, rel=5e-3)


@pytest.mark.parametrize('kind,expected,discretization', [
    ('rdp', 2.730, 1e-4), ('pld', 2.576, 1e-3)])
def test_reference_calibration(kind, expected, discretization):
  sigma = accounting.calibrate_noise_multiplier(
      8.0, 1e-5, 4096 / 50000, 2500, kind, pld_discretization=discretization)
  assert sigma == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize('kind', ['rdp', 'pld'])
def test_calibration_round_trip(kind):
  q, steps, target = 0.01, 500, 2.0
  sigma = accounting.calibrate_noise_multiplier(target, 1e-5, q, steps, kind)
  eps = accounting.epsilon(accounting.dpsgd_event(sigma, q, steps), 1e-5, kind)
  assert eps <= target
  assert eps == pytest.approx(target, rel=1e-2)
  # A slightly smaller sigma must overshoot: the result is (nearly) minimal.
  worse = accounting.epsilon(
      accounting.dpsgd_event(0.98 * sigma, q, steps), 1e-5, kind)
  assert worse > target


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
  eps = lambda s, t: accounting.epsilon(  # pylint: disable=g-long-lambda
      accounting.dpsgd_event(s, 0.01, t), 1e-5)
  assert eps(1.0, 100) < eps(1.0, 1000)
  assert eps(2.0, 1000) < eps(1.0, 1000)


def test_zero_noise_is_infinite_epsilon():
  assert accounting.epsilon(accounting.dpsgd_event(0.0, 0.1, 10), 1e-5) == (
      math.inf)


class TestDelta:

  @pytest.mark.parametrize('delta', [0.0, -1e-5, 1.0, 2.0])
  def test_out_of_range(self, delta):
    with pytest.raises(ValueError, match='delta'):
      accounting.check_delta(delta)

  def test_refuses_delta_at_least_one_over_n(self):
    with pytest.raises(ValueError, match='1/N'):
      accounting.check_delta(1e-3, dataset_size=1000)
    assert accounting.check_delta(1e-5, dataset_size=1000) == 1e-5


def test_sampling_rate_refuses_batch_larger_than_dataset():
  with pytest.raises(ValueError, match='larger than the dataset'):
    accounting.sampling_rate(2000, 1000)


def test_steps_for_epochs_matches_reference_table():
  assert accounting.steps_for_epochs(60, 256 / 60000) == 14062
  assert accounting.steps_for_epochs(15, 256 / 60000) == 3515


class TestLedger:

  def test_matches_direct_composition(self):
    ledger = accounting.PrivacyLedger()
    step = accounting.poisson_gaussian_event(1.1, 256 / 60000)
    for _ in range(3515):
      ledger.record(step)
    assert len(ledger.entries) == 1
    direct = accounting.epsilon(
        accounting.dpsgd_event(1.1, 256 / 60000, 3515), 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(direct, rel=1e-9)

  def test_extra_release_increases_epsilon(self):
    ledger = accounting.PrivacyLedger()
    ledger.record(accounting.poisson_gaussian_event(1.0, 0.01), count=100)
    before = ledger.epsilon(1e-5)
    ledger.record(dp_accounting.GaussianDpEvent(10.0))
    assert ledger.epsilon(1e-5) > before

  def test_empty_ledger_is_zero(self):
    assert accounting.PrivacyLedger().epsilon(1e-5) == 0.0


class TestCli:

  def test_reproduces_reference_table(self, capsys):
    for q, sigma, steps, rdp, pld in REFERENCE:
      n = 60000 if q < 0.01 else 50000
      privacy_cli.main(['-N', str(n), '-B', str(round(q * n)),
                        '--noise-multiplier', str(sigma), '--steps',
                        str(steps), '--accountant', 'both', '--json'])
      out = capsys.readouterr().out
      import json  # pylint: disable=g-import-not-at-top
      result = json.loads(out)
      assert result['epsilon_rdp'] == pytest.approx(rdp, rel=5e-3)
      assert result['epsilon_pld'] == pytest.approx(pld, rel=5e-3)

  def test_epochs_and_text_output(self, capsys):
    privacy_cli.main(['-N', '60000', '-B', '256', '--noise-multiplier', '1.1',
                      '--epochs', '60'])
    out = capsys.readouterr().out
    assert '14062 steps' in out and 'epsilon = 2.59' in out

  def test_target_epsilon(self, capsys):
    privacy_cli.main(['-N', '50000', '-B', '4096', '--steps', '2500',
                      '--target-epsilon', '8'])
    assert 'noise multiplier = 2.73' in capsys.readouterr().out

  @pytest.mark.parametrize('argv,match', [
      (['--delta', '0.5'], 'delta'),
      (['-B', '100000'], 'larger than the dataset'),
      (['--noise-multiplier', '-1'], 'noise_multiplier'),
  ])
  def test_bad_input_exits_with_message(self, argv, match, capsys):
    base = {'-N': '60000', '-B': '256', '--noise-multiplier': '1.1',
            '--epochs': '1'}
    for k, v in zip(argv[::2], argv[1::2]):
      base[k] = v
    args = [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit):
      privacy_cli.main(args)
    assert match in capsys.readouterr().err


# TF Privacy's README (MNIST tutorial, legacy compute_dp_sgd_privacy: the
# classic RDP conversion), N = 60000, B = 256, delta = 1e-5, eps to 2 decimals.
TF_PRIVACY_LEGACY = [
    # (sigma, epochs, eps)
    (1.1, 60, 3.01),
    (1.3, 15, 1.19),
    (0.7, 45, 7.10),
    (1.1, 1, 1.03),
]


class TestClassicConversion:
  """``--conversion classic`` reproduces TF Privacy's legacy numbers."""

  @pytest.mark.parametrize('sigma,epochs,eps', TF_PRIVACY_LEGACY)
  def test_cli_reproduces_tf_privacy(self, sigma, epochs, eps, capsys):
    privacy_cli.main(['-N', '60000', '-B', '256', '--noise-multiplier',
                      str(sigma), '--epochs', str(epochs), '--conversion',
                      'classic', '--json'])
    import json  # pylint: disable=g-import-not-at-top
    result = json.loads(capsys.readouterr().out)
    assert result['conversion'] == 'classic'
    assert result['steps'] == math.ceil(epochs * 60000 / 256)  # TF rounds up
    assert result['epsilon_rdp_classic'] == pytest.approx(eps, rel=5e-3)

  def test_classic_text_names_the_conversion(self, capsys):
    privacy_cli.main(['-N', '60000', '-B', '256', '--noise-multiplier', '1.1',
                      '--epochs', '60', '--conversion', 'classic'])
    out = capsys.readouterr().out
    assert '14063 steps' in out and 'epsilon = 3.009' in out
    assert 'classic conversion (Mironov 2017' in out

  def test_default_output_explains_the_smaller_epsilon(self, capsys):
    privacy_cli.main(['-N', '60000', '-B', '256', '--noise-multiplier', '1.1',
                      '--epochs', '60'])
    out = ' '.join(capsys.readouterr().out.split())
    assert 'epsilon = 2.59' in out
    assert 'improved conversion' in out
    assert "TF Privacy's legacy compute_dp_sgd_privacy reports epsilon = 3.009" in out
    assert 'looser bound' in out and '--conversion classic' in out

  def test_classic_is_looser_than_improved(self):
    for sigma, q, steps in [(1.1, 0.004, 1000), (0.7, 0.01, 5000),
                            (3.0, 0.08, 2500)]:
      event = accounting.dpsgd_event(sigma, q, steps)
      classic, _ = accounting.rdp_epsilon(event, 1e-5, 'classic')
      improved, _ = accounting.rdp_epsilon(event, 1e-5, 'improved')
      assert improved == pytest.approx(accounting.epsilon(event, 1e-5),
                                       rel=1e-9)
      assert classic > improved

  def test_classic_calibration_round_trip(self, capsys):
    q, steps = 4096 / 50000, 2500
    sigma = accounting.calibrate_noise_multiplier_classic(8.0, 1e-5, q, steps)
    eps, _ = accounting.rdp_epsilon(accounting.dpsgd_event(sigma, q, steps),
                                    1e-5, 'classic')
    assert eps <= 8.0 and eps == pytest.approx(8.0, rel=1e-2)
    assert sigma > accounting.calibrate_noise_multiplier(8.0, 1e-5, q, steps)
    privacy_cli.main(['-N', '50000', '-B', '4096', '--steps', '2500',
                      '--target-epsilon', '8', '--conversion', 'classic'])
    assert f'noise multiplier = {sigma:.4f}' in capsys.readouterr().out

  def test_classic_refuses_pld(self, capsys):
    with pytest.raises(SystemExit):
      privacy_cli.main(['-N', '60000', '-B', '256', '--noise-multiplier',
                        '1.1', '--epochs', '1', '--conversion', 'classic',
                        '--accountant', 'pld'])
    assert '--accountant rdp' in capsys.readouterr().err

  def test_zero_noise(self):
    event = accounting.dpsgd_event(0.0, 0.01, 10)
    assert accounting.rdp_epsilon(event, 1e-5, 'classic')[0] == math.inf


class TestGaussianDp:
  """Closed-form GDP (Dong, Roth, Su 2022) for batch clipping (PAPERS.md 2)."""

  def test_eps8_delta1e5_needs_mu_1666(self):
    assert accounting.gdp_mu(8.0, 1e-5) == pytest.approx(1.666, abs=5e-4)

  @pytest.mark.parametrize('epochs,sigma', [(10, 1.90), (50, 4.24),
                                            (100, 6.00)])
  def test_noise_for_epochs_matches_the_paper(self, epochs, sigma):
    got = accounting.calibrate_gaussian_composition(8.0, 1e-5, epochs, 'gdp')
    assert got == pytest.approx(sigma, abs=0.005)

  def test_delta_closed_form(self):
    from scipy import stats  # pylint: disable=g-import-not-at-top
    for mu, eps in [(0.5, 0.0), (1.0, 1.0), (2.0, 3.0), (1.666, 8.0)]:
      expected = (stats.norm.cdf(-eps / mu + mu / 2)
                  - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))
      assert accounting.gdp_delta(mu, eps) == pytest.approx(expected,
                                                            rel=1e-9)
    assert accounting.gdp_delta(1.666, 8.0) == pytest.approx(1e-5, rel=2e-3)

  def test_epsilon_and_mu_are_inverse(self):
    for mu in (0.3, 1.0, 4.0):
      eps = accounting.gdp_epsilon(mu, 1e-5)
      assert accounting.gdp_delta(mu, eps) == pytest.approx(1e-5, rel=1e-6)
      assert accounting.gdp_mu(eps, 1e-5) == pytest.approx(mu, rel=1e-6)

  def test_composition_matches_pld_and_is_tighter_than_rdp(self):
    event = accounting.gaussian_composition_event(3.0, 20)
    gdp = accounting.epsilon(event, 1e-5, 'gdp')
    assert gdp == pytest.approx(
        accounting.gdp_epsilon(math.sqrt(20) / 3.0, 1e-5), rel=1e-9)
    assert accounting.epsilon(event, 1e-5, 'pld') == pytest.approx(gdp,
                                                                    rel=1e-2)
    assert accounting.epsilon(event, 1e-5, 'rdp') > gdp

  def test_refuses_subsampled_events(self):
    with pytest.raises(ValueError, match="'rdp' or 'pld'"):
      accounting.epsilon(accounting.dpsgd_event(1.0, 0.01, 10), 1e-5, 'gdp')

  @pytest.mark.parametrize('kind', ['pld', 'rdp'])
  def test_numerical_calibration_round_trip(self, kind):
    sigma = accounting.calibrate_gaussian_composition(4.0, 1e-5, 30, kind)
    eps = accounting.epsilon(accounting.gaussian_composition_event(sigma, 30),
                             1e-5, kind)
    assert eps <= 4.0 and eps == pytest.approx(4.0, rel=1e-2)

  def test_group_privacy_of_batch_clipping(self):
    # One clipped group per step: the paper's sqrt(g E) / sigma.
    assert accounting.batch_clipping_mu(2.0, 9, group_privacy=4) == (
        pytest.approx(math.sqrt(4 * 9) / 2.0))
    # K groups per step: g <= K examples in one step add up linearly.
    assert accounting.batch_clipping_mu(2.0, 9, 4, groups_per_step=8) == (
        pytest.approx(4 * 3 / 2.0))
    assert accounting.batch_clipping_mu(2.0, 9, 5, groups_per_step=2) == (
        pytest.approx(math.sqrt(9 * (2 * 4 + 1)) / 2.0))
    assert accounting.batch_clipping_mu(2.0, 9) == pytest.approx(1.5)
