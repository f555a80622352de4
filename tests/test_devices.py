"""Device facts: platform and GPU generation from what JAX reports, the accelerator table."""

import types

import jax
import pytest

from euro_lm import devices
from euro_lm.errors import ConfigError


def _jax_device(platform, version='', capability=None, kind=''):
  device = types.SimpleNamespace(
      platform=platform, device_kind=kind, client=types.SimpleNamespace(platform_version=version)
  )
  if capability:
    device.compute_capability = capability
  return device


@pytest.mark.parametrize(
    'device,expected',
    [
        (
            _jax_device('gpu', 'CUDA 12.8', '9.0', 'NVIDIA H100 80GB HBM3'),
            devices.Device('cuda', hopper=True, kind='NVIDIA H100 80GB HBM3', capability='9.0'),
        ),
        (
            _jax_device('gpu', 'CUDA 12.8', '8.0', 'NVIDIA A100-SXM4-64GB'),
            devices.Device('cuda', kind='NVIDIA A100-SXM4-64GB', capability='8.0'),
        ),
        # Blackwell (sm100) has no wgmma: not Hopper.
        (
            _jax_device('gpu', 'CUDA 12.8', '10.0', 'NVIDIA B200'),
            devices.Device('cuda', kind='NVIDIA B200', capability='10.0'),
        ),
        # JAX calls AMD GPUs 'gpu' too; the runtime's version names ROCm.
        (
            _jax_device('gpu', 'rocm 6.2', 'gfx90a', 'AMD Instinct MI250X'),
            devices.Device('rocm', kind='AMD Instinct MI250X'),
        ),
        (_jax_device('tpu', kind='TPU v5 lite'), devices.Device('tpu', kind='TPU v5 lite')),
    ],
)
def test_describe_tells_platform_and_generation(device, expected):
  assert devices.describe(device) == expected


def test_this_machine_is_a_cpu():
  assert devices.describe().platform == 'cpu' == devices.platform(jax.devices()[0])


def test_accelerators_by_name_and_by_device_kind():
  assert devices.accelerator('h100_pcie').name == 'H100 PCIe'
  assert devices.accelerator('TPU-v5-lite').peak_flops_16bit == 197e12
  # The most specific name wins: an H100 PCIe is not the SXM part, a GH200 not an H200.
  assert devices.find_accelerator('NVIDIA H100 PCIe').name == 'H100 PCIe'
  assert devices.find_accelerator('NVIDIA GH200 480GB').name == 'GH200'
  assert devices.find_accelerator('NVIDIA H100 80GB HBM3').peak_flops_16bit == 989e12
  assert devices.find_accelerator('cpu') is None
  assert devices.accelerator_device('h200') == devices.Device('cuda', hopper=True, kind='H200')
  assert devices.accelerator_device('mi250x') == devices.Device('rocm', kind='MI250X')
  with pytest.raises(ConfigError, match="unknown accelerator 'b300'; known: H100 PCIe"):
    devices.accelerator('b300')


def test_fp8_matmuls_from_hopper_on():
  """What `model.fp8` needs (euro_lm.config.validate): NVIDIA sm90 or newer."""
  assert devices.Device('cuda', hopper=True).fp8_matmuls
  assert devices.Device('cuda', capability='10.0').fp8_matmuls
  assert not devices.Device('cuda', capability='8.0').fp8_matmuls
  assert not devices.Device('rocm', kind='AMD Instinct MI300X').fp8_matmuls
  assert not devices.Device('tpu', kind='TPU v6').fp8_matmuls
