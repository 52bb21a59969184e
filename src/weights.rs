//! Memory-mapped safetensors files: tensors are read in place and converted to f32 on demand
//! (adapters ship as f16; the model's float32 weights are borrowed without a copy).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::quant::{self, Q4Matrix};

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

    /// The tensor's bytes in the mapping, when stored as u8 (quantized blocks; else `None`).
    pub fn u8_bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.tensors.get(name)?;
        (info.dtype == Dtype::U8).then(|| &self.map[info.start..info.end])
    }

    /// The 4-bit matrix stored as `name.q4` / `.scales` / `.offsets` (see [`quant`]), or `None` when
    /// the file has no `name.q4`.
    pub fn q4(&self, name: &str) -> Result<Option<Q4Matrix>> {
        let Some(info) = self.tensors.get(&format!("{name}.q4")) else { return Ok(None) };
        let bad = |msg: String| Error::model(&self.path, format!("4-bit tensor '{name}': {msg}"));
        let [rows, nb, half] = info.shape[..] else { return Err(bad(format!("shape {:?} is not 3-D", info.shape))) };
        let block = 2 * half;
        let packed = self.u8_bytes(&format!("{name}.q4")).ok_or_else(|| bad("blocks are not u8".into()))?.to_vec();
        let scales = self.f32(&format!("{name}.scales"))?.into_owned();
        let offsets = self.f32(&format!("{name}.offsets"))?.into_owned();
        if block == 0 || scales.len() != rows * nb || offsets.len() != rows * nb {
            return Err(bad(format!(
                "{} scales and {} offsets for {rows} rows of {nb} blocks",
                scales.len(),
                offsets.len()
            )));
        }
        Ok(Some(Q4Matrix { rows, cols: nb * block, block, packed, scales, offsets }))
    }

    /// A model matrix as f32 values whatever its storage: float32 (borrowed), 4-bit (decoded).
    pub fn dense(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        match self.q4(name)? {
            Some(m) => Ok(Cow::Owned(m.decode())),
            None => self.f32(name),
        }
    }

    /// Row `row` of a 2-D model matrix as f32: float32, or 8-bit (`name.q8` + `name.scales`, the
    /// embedding of a quantized folder).
    pub fn dense_row(&self, name: &str, row: usize) -> Result<Vec<f32>> {
        let q8 = format!("{name}.q8");
        let Some(info) = self.tensors.get(&q8) else { return self.f32_row(name, row) };
        let [rows, nb, block] = info.shape[..] else {
            return Err(Error::model(&self.path, format!("8-bit tensor '{q8}' has shape {:?}, not 3-D", info.shape)));
        };
        let data = self.u8_bytes(&q8).ok_or_else(|| Error::model(&self.path, format!("'{q8}' is not u8")))?;
        let scales = self.f32(&format!("{name}.scales"))?;
        if row >= rows || scales.len() != rows * nb {
            return Err(Error::model(&self.path, format!("tensor '{q8}': cannot read row {row} of {rows}")));
        }
        Ok(quant::decode_q8_row(data, &scales, nb * block, block, row))
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
