"""What the hardware is: platform, GPU generation, peak FLOP/s and memory.

Every other module asks here. JAX calls CUDA and ROCm GPUs both 'gpu'; `Device.platform`
tells them apart ('cpu', 'cuda', 'rocm', 'tpu').
"""

import dataclasses
import re

import jax

from euro_lm.errors import ConfigError

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One known accelerator, as one JAX device sees it."""

  name: str  # matched as a substring of `jax.Device.device_kind`
  platform: str  # 'cuda', 'rocm' or 'tpu'
  peak_flops_16bit: float  # dense bfloat16/float16 FLOP/s (datasheet, no sparsity)
  memory_gib: float  # device memory
  hopper: bool = False  # an NVIDIA sm90 GPU, where euro_lm's Mosaic GPU kernels run


# Matched in order against `device_kind`, so more specific names come first. The A100 row is
# the 80 GB part (the planner takes `--device_memory_gb=40` for the 40 GB one); an MI250X is
# one GCD, as LUMI-G exposes each GCD as a device; a TPU v5p reports plain 'TPU v5'.
ACCELERATORS = (
    Accelerator('H100 PCIe', 'cuda', 756e12, 80, hopper=True),
    Accelerator('H100 NVL', 'cuda', 835e12, 94, hopper=True),
    Accelerator('H100', 'cuda', 989e12, 80, hopper=True),
    Accelerator('GH200', 'cuda', 989e12, 96, hopper=True),
    Accelerator('H200', 'cuda', 989e12, 141, hopper=True),
    Accelerator('A100', 'cuda', 312e12, 80),
    Accelerator('MI300X', 'rocm', 1307e12, 192),
    Accelerator('MI250X', 'rocm', 191.5e12, 64),
    Accelerator('TPU v6', 'tpu', 918e12, 32),
    Accelerator('TPU v5 lite', 'tpu', 197e12, 16),
    Accelerator('TPU v5', 'tpu', 459e12, 95),
    Accelerator('TPU v4', 'tpu', 275e12, 32),
)


@dataclasses.dataclass(frozen=True)
class Link:
  """A link collectives run over, as one device sees it."""

  name: str
  bytes_per_s: float  # per device, per direction
  where: str  # what it is and where the figure comes from


# Per device and direction. Network figures are a node's injection bandwidth (NICs x line
# rate, as the centres' hardware pages give them) over its devices. MareNostrum 5's is not
# here: its figure was not found in a source this project could check.
LINKS = (
    # NVIDIA H100 SXM datasheet: NVLink 4, 900 GB/s per GPU, both directions together.
    Link('nvlink4', 450e9, 'NVLink 4 (H100/H200 SXM), 900 GB/s per GPU bidirectional'),
    # NVIDIA A100 datasheet: NVLink 3, 600 GB/s per GPU bidirectional.
    Link('nvlink3', 300e9, 'NVLink 3 (A100 SXM), 600 GB/s per GPU bidirectional'),
    # InfiniBand NDR: 400 Gb/s per port; DGX H100 has one ConnectX-7 port per GPU.
    Link('ndr', 50e9, 'InfiniBand NDR, 400 Gb/s per GPU (one NIC per GPU, DGX H100)'),
    # HPE Slingshot-11: 200 Gb/s per NIC.
    Link('slingshot11', 25e9, 'Slingshot-11, one 200 Gb/s NIC per device'),
    # LUMI-G: "four 200 Gb/s interfaces to the Slingshot-11 interconnect", one per MI250X,
    # for 8 GCDs (docs.lumi-supercomputer.eu, hardware/compute/lumig).
    Link('lumi', 12.5e9, 'LUMI-G: 4 x 200 Gb/s Slingshot-11 per node / 8 GCDs'),
    # Leonardo Booster: "2x dual-port HDR network interface (400 Gbps aggregated)" per node
    # of 4 A100 (leonardo-supercomputer.cineca.eu/hpc-system).
    Link('leonardo', 12.5e9, 'Leonardo Booster: 400 Gb/s HDR per node / 4 A100'),
    # JUPITER Booster: "4x InfiniBand NDR200" per node of 4 GH200; in the node "NVLink 4
    # GPU-to-GPU links, 300 GB/s between pairs of GPUs (150 GB/s per direction)"
    # (apps.fz-juelich.de/jsc/hps/jupiter/configuration.html).
    Link('jupiter', 25e9, 'JUPITER Booster: 4 x 200 Gb/s NDR200 per node / 4 GH200'),
    Link('jupiter_nvlink', 150e9, 'JUPITER Booster in a node: NVLink 4, 150 GB/s per pair'),
)


def link_names() -> tuple[str, ...]:
  return tuple(x.name for x in LINKS)


def link(name: str) -> Link:
  """A known link by name ('nvlink4', 'ndr', 'slingshot11', 'lumi', ...), ignoring case,
  spaces, '-' and '_'. Raises ConfigError listing the known names."""
  for known in LINKS:
    if _normalise(known.name) == _normalise(name):
      return known
  raise ConfigError(f'unknown link {name!r}; known: {", ".join(link_names())}')


@dataclasses.dataclass(frozen=True)
class Device:
  """What a run computes on, as far as choosing kernels and checking a config needs."""

  platform: str  # one of PLATFORMS
  hopper: bool = False  # an NVIDIA sm90 GPU
  kind: str = ''  # `jax.Device.device_kind`, or an accelerator's name
  capability: str = ''  # a CUDA GPU's compute capability ('9.0'), else ''

  @property
  def gpu(self) -> bool:
    return self.platform in ('cuda', 'rocm')

  @property
  def fp8_matmuls(self) -> bool:
    """An NVIDIA GPU with fp8 tensor cores that XLA uses: Hopper (sm90) or newer."""
    major = self.capability.split('.')[0]
    return self.platform == 'cuda' and (self.hopper or (major.isdigit() and int(major) >= 9))


def platform(device: jax.Device) -> str:
  """'cpu', 'tpu', 'cuda' or 'rocm' of a JAX device."""
  if device.platform != 'gpu':
    return device.platform
  return 'rocm' if 'rocm' in device.client.platform_version.lower() else 'cuda'


def describe(device: jax.Device | None = None) -> Device:
  """The `Device` of a JAX device; by default the first of the default backend."""
  device = device or jax.devices()[0]
  name = platform(device)
  capability = str(getattr(device, 'compute_capability', ''))
  return Device(
      platform=name,
      hopper=name == 'cuda' and capability.startswith('9.'),
      kind=device.device_kind,
      capability=capability if name == 'cuda' else '',
  )


def find_accelerator(device_kind: str) -> Accelerator | None:
  """The known accelerator whose name `device_kind` contains, or None."""
  for known in ACCELERATORS:
    if known.name in device_kind:
      return known
  return None


def _normalise(name):
  return re.sub(r'[\s_\-]', '', name).lower()


def accelerator_names() -> tuple[str, ...]:
  return tuple(a.name for a in ACCELERATORS)


def accelerator(name: str) -> Accelerator:
  """A known accelerator by name, ignoring case, spaces, '-' and '_' ('h100', 'tpu_v5_lite',
  'H100 PCIe'). Raises ConfigError listing the known names."""
  for known in ACCELERATORS:
    if _normalise(known.name) == _normalise(name):
      return known
  raise ConfigError(f'unknown accelerator {name!r}; known: {", ".join(accelerator_names())}')


def accelerator_device(name: str) -> Device:
  """The `Device` a run on the named accelerator computes on (for planning)."""
  known = accelerator(name)
  return Device(platform=known.platform, hopper=known.hopper, kind=known.name)
