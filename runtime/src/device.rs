//! Where a model runs, as users name it: `cpu`, `cuda[:N]` or `metal`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A device by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU engine.
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (candle's `cuda` feature).
    Cuda(usize),
    /// The Apple GPU (candle's `metal` feature).
    Metal,
}

/// A name that is no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device '{0}' (cpu, cuda[:N], metal)")]
pub struct UnknownDevice(pub String);

impl FromStr for DeviceSpec {
    type Err = UnknownDevice;

    fn from_str(s: &str) -> Result<DeviceSpec, UnknownDevice> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "metal" => Ok(DeviceSpec::Metal),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| UnknownDevice(s.into())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceSpec {
    /// Open the device; a GPU this build has no backend for is candle's error.
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n),
            DeviceSpec::Metal => Device::new_metal(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for s in ["cpu", "cuda:0", "cuda:3", "metal"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }
}
