//! Memory-mapped safetensors files: tensors are read in place and converted to f32 on demand
//! (adapters ship as f16; the model's float32 weights are borrowed without a copy).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct WeightFile {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, TensorInfo>,
}

impl WeightFile {
    pub fn open(path: &Path) -> Result<WeightFile> {
        let file =
            File::open(path).map_err(|source| Error::Io { what: "weights", path: path.to_path_buf(), source })?;
        // SAFETY: the file is opened read-only; Crayon never writes model or pool files while serving,
        // and installed files are replaced by rename, which keeps this mapping's inode intact.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            what: "weights (mmap)",
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| Error::model(path, format!("not a valid safetensors file: {e}")))?;
        let base = map.as_ptr() as usize;
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let start = view.data().as_ptr() as usize - base;
                let info = TensorInfo {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                (name, info)
            })
            .collect();
        Ok(WeightFile { path: path.to_path_buf(), map, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor as f32 values (borrowed when stored as aligned f32, converted from f16/bf16 otherwise).
    pub fn f32(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        let info =
            self.tensors.get(name).ok_or_else(|| Error::model(&self.path, format!("tensor '{name}' is missing")))?;
        let bytes = &self.map[info.start..info.end];
        Ok(match info.dtype {
            Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => {
                    Cow::Owned(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
                }
            },
            Dtype::F16 => {
                Cow::Owned(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            Dtype::BF16 => {
                Cow::Owned(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            other => {
                return Err(Error::model(
                    &self.path,
                    format!("tensor '{name}' has dtype {other:?} (expected F32, F16 or BF16)"),
                ));
            }
        })
    }

    /// The tensor's bytes in the mapping, when stored as 4-byte-aligned f32 (else `None`).
    pub fn f32_bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.tensors.get(name)?;
        let bytes = &self.map[info.start..info.end];
        (info.dtype == Dtype::F32 && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok()).then_some(bytes)
    }

    /// Drops this mapping's resident pages (they are read again from the file if used). ONNX Runtime
    /// reads most shared weights once, to pack them, so they need not count against the process.
    pub fn release_resident_pages(&self) {
        // SAFETY: a read-only mapping of a file Crayon never writes: a dropped page reads back unchanged.
        if let Err(e) = unsafe { self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
            tracing::debug!(path = %self.path.display(), "madvise(DONTNEED) failed: {e}");
        }
    }

    /// Row `row` of a 2-D tensor stored as f32 (e.g. one token's embedding).
    pub fn f32_row(&self, name: &str, row: usize) -> Result<Vec<f32>> {
        let info =
            self.tensors.get(name).ok_or_else(|| Error::model(&self.path, format!("tensor '{name}' is missing")))?;
        if info.dtype != Dtype::F32 || info.shape.len() != 2 || row >= info.shape[0] {
            return Err(Error::model(
                &self.path,
                format!("tensor '{name}': cannot read row {row} of {:?} {:?}", info.dtype, info.shape),
            ));
        }
        let width = info.shape[1] * 4;
        let start = info.start + row * width;
        Ok(self.map[start..start + width]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}
