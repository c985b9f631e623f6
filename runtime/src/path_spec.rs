//! `MODEL[+ADAPTER[:SCALE]]...`: a model file with adapters attached, as the
//! CLI, the demo and apps name a path to run.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::Device;

use crate::lora::LoraAdapter;
use crate::model::{Model, RuntimeError};

/// An adapter file and the scale it is attached at.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// The LoRA GGUF.
    pub path: PathBuf,
    /// Its scale (1 unless given).
    pub scale: f64,
}

/// A model file and the adapters attached to it, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct PathSpec {
    /// The GGUF model.
    pub model: PathBuf,
    /// Adapters attached in order.
    pub adapters: Vec<AdapterSpec>,
}

/// A spec that names no file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("'{spec}': {problem} (expected MODEL.gguf[+ADAPTER.gguf[:SCALE]]...)")]
pub struct PathSpecError {
    /// The text given.
    pub spec: String,
    /// What is missing.
    pub problem: &'static str,
}

impl FromStr for AdapterSpec {
    type Err = PathSpecError;

    /// `PATH[:SCALE]`: the part after the last ':' is the scale when it is
    /// a number (so `C:\adapters\a.gguf` is a path).
    fn from_str(s: &str) -> Result<AdapterSpec, PathSpecError> {
        let (path, scale) = match s.rsplit_once(':') {
            Some((p, sc)) => match sc.parse::<f64>() {
                Ok(scale) => (p, scale),
                Err(_) => (s, 1.0),
            },
            None => (s, 1.0),
        };
        if path.is_empty() {
            return Err(PathSpecError {
                spec: s.into(),
                problem: "the adapter path is empty",
            });
        }
        Ok(AdapterSpec {
            path: path.into(),
            scale,
        })
    }
}

impl FromStr for PathSpec {
    type Err = PathSpecError;

    fn from_str(s: &str) -> Result<PathSpec, PathSpecError> {
        let mut parts = s.split('+');
        let model = parts.next().unwrap_or_default();
        if model.is_empty() {
            return Err(PathSpecError {
                spec: s.into(),
                problem: "the model path is empty",
            });
        }
        let adapters = parts
            .map(|a| {
                a.parse().map_err(|e: PathSpecError| PathSpecError {
                    spec: s.into(),
                    problem: e.problem,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(PathSpec {
            model: model.into(),
            adapters,
        })
    }
}

impl fmt::Display for AdapterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.scale != 1.0 {
            write!(f, ":{}", self.scale)?;
        }
        Ok(())
    }
}

impl fmt::Display for PathSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.model.display())?;
        for a in &self.adapters {
            write!(f, "+{a}")?;
        }
        Ok(())
    }
}

impl PathSpec {
    /// A model alone.
    pub fn model(path: impl Into<PathBuf>) -> PathSpec {
        PathSpec {
            model: path.into(),
            adapters: Vec::new(),
        }
    }

    /// This path with `adapter` attached at `scale` too.
    pub fn with_adapter(mut self, adapter: impl Into<PathBuf>, scale: f64) -> PathSpec {
        self.adapters.push(AdapterSpec {
            path: adapter.into(),
            scale,
        });
        self
    }

    /// Load the model and attach the adapters.
    pub fn load(&self, device: &Device) -> Result<Model, RuntimeError> {
        let mut model = Model::load(&self.model, device)?;
        for a in &self.adapters {
            model.attach(&LoraAdapter::load(&a.path)?, a.scale)?;
        }
        Ok(model)
    }

    /// Bytes of the files on disk (0 for one that cannot be read).
    pub fn file_bytes(&self) -> u64 {
        std::iter::once(&self.model)
            .chain(self.adapters.iter().map(|a| &a.path))
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let p: PathSpec = "base.gguf+a.gguf:0.5+b.gguf".parse().unwrap();
        assert_eq!(
            p,
            PathSpec::model("base.gguf")
                .with_adapter("a.gguf", 0.5)
                .with_adapter("b.gguf", 1.0)
        );
        assert_eq!(p.to_string(), "base.gguf+a.gguf:0.5+b.gguf");
        // A ':' not followed by a number is part of the path.
        let w: AdapterSpec = r"C:\adapters\a.gguf".parse().unwrap();
        assert_eq!(
            (w.path, w.scale),
            (PathBuf::from(r"C:\adapters\a.gguf"), 1.0)
        );
        assert!("".parse::<PathSpec>().is_err());
        assert!("+a.gguf".parse::<PathSpec>().is_err());
        let e = "m.gguf+:2".parse::<PathSpec>().unwrap_err();
        assert_eq!(e.problem, "the adapter path is empty");
    }
}
