//! The model's weights, shared by every ONNX Runtime session of one engine: the base model's and each
//! ready blend's.
//!
//! Left to itself, each session reads its own copy of every initializer from the weights file and
//! pre-packs its own copy of every MatMul weight, so a blend of the 0.5B server model cost ~3 GB
//! although only its adapter-targeted matrices differ from the base. Here every f32 initializer is a
//! tensor over the memory-mapped safetensors file (no copy: file-backed pages that the kernel shares
//! with other processes mapping the file and can drop under pressure), handed to ONNX Runtime as a
//! *shared* initializer, and one pre-packed weights container lets all sessions use one packed copy of
//! each. A blend's merged matrices stay session-local (external initializers), so they and their packed
//! copies go away with the blend's session.
//!
//! The container is used only when blends leave some packed (matrix) weights untouched, e.g. a pool
//! targeting q/k/v/o/down of Qwen2.5 leaves gate/up and the LM head: then it saves their packed copy
//! in every blend. When the pool targets every matrix (SmolLM2's pool: all seven per layer, tied LM
//! head) there is nothing to share, and overrides are plain initializers, which build ~0.3 s faster.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

use ort::AsPointer;
use ort::memory::{Allocator, MemoryInfo};
use ort::session::builder::{PrepackedWeights, SessionBuilder};
use ort::value::DynValue;

use super::FusedGroup;
use crate::error::{Error, Result};
use crate::weights::WeightFile;

/// The output projection's name when it is not tied to the embedding.
const LM_HEAD: &str = "lm_head.weight";

pub struct SharedWeights {
    /// Tensors over `file`'s mapping; sessions hold clones, and every session is dropped before this
    /// struct (a `Decoder` keeps an `Arc` to it, declared after its session).
    values: HashMap<String, Arc<DynValue>>,
    /// `Some` when blends leave packed weights to share.
    prepacked: Option<PrepackedWeights>,
    tied_head_bytes: usize,
    _file: Arc<WeightFile>,
}

impl SharedWeights {
    /// Wraps each f32 and u8 tensor of the model's mapped weights file (others are left to ONNX
    /// Runtime). `blended`: the graph initializers blends replace; `embedding`: the float32 token
    /// embedding table (read by a lookup, never packed).
    /// `fused`: projections the graph reads as one tensor per suffix (`suffixes`: `.q4` / `.scales` /
    /// `.offsets`), mapped over their members' adjacent bytes; the members themselves are then not graph
    /// initializers and are not attached.
    pub fn new(
        file: Arc<WeightFile>,
        blended: &HashSet<String>,
        embedding: &str,
        fused: &[FusedGroup],
        suffixes: &[&str],
    ) -> Result<SharedWeights> {
        use ort::sys::ONNXTensorElementDataType as T;
        let mut values = HashMap::new();
        let mut bytes = 0;
        let tensor = |name: &str| -> Option<Mapped<'_>> {
            let info = file.info(name)?;
            let (data, elem) = match (file.f32_bytes(name), file.u8_bytes(name)) {
                (Some(d), _) => (d, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                (None, Some(d)) => (d, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
                _ => return None,
            };
            Some((data, elem, info.shape.iter().map(|&d| d as i64).collect()))
        };
        let mut members = HashSet::new();
        for group in fused {
            for suffix in suffixes {
                let names: Vec<String> = group.members.iter().map(|m| format!("{m}{suffix}")).collect();
                let (data, elem, shape) = span(&file, &names, &tensor)?;
                let name = format!("{}{suffix}", group.name);
                let value = unsafe { mapped_tensor(data, &shape, elem) }
                    .map_err(|msg| Error::Ort { context: format!("sharing weight {name}"), msg })?;
                bytes += data.len();
                values.insert(name, Arc::new(value));
                members.extend(names);
            }
        }
        for name in file.names().filter(|n| !members.contains(*n)) {
            let Some((data, elem, shape)) = tensor(name) else { continue };
            let value = unsafe { mapped_tensor(data, &shape, elem) }
                .map_err(|msg| Error::Ort { context: format!("sharing weight {name}"), msg })?;
            bytes += data.len();
            values.insert(name.to_string(), Arc::new(value));
        }
        // A matrix no blend replaces can have one pre-packed copy for every session.
        let share_packed = !blended.is_empty()
            && values.iter().any(|(name, v)| {
                !blended.contains(name)
                    && name != embedding
                    && v.shape().len() >= 2
                    && !name.ends_with(".scales")
                    && !name.ends_with(".offsets")
            });
        tracing::info!(mapped_mb = bytes >> 20, share_packed, "model weights shared across sessions");
        let prepacked = share_packed.then(PrepackedWeights::new);
        let tied_head_bytes = match file.info(LM_HEAD) {
            Some(_) => 0,
            None => file.f32_bytes(embedding).map_or(0, <[u8]>::len),
        };
        Ok(SharedWeights { values, prepacked, tied_head_bytes, _file: file })
    }

    pub fn tied_head_bytes(&self) -> usize {
        self.tied_head_bytes
    }

    /// Whether sessions share one container of packed weights (see the module comment).
    pub fn packs_shared(&self) -> bool {
        self.prepacked.is_some()
    }

    /// Adds every shared weight not in `skip` (the names a blend overrides) and the shared container.
    pub(super) fn attach(&self, mut builder: SessionBuilder, skip: &[String]) -> Result<SessionBuilder> {
        if let Some(p) = &self.prepacked {
            builder = builder.with_prepacked_weights(p).map_err(Error::ort("sharing pre-packed weights"))?;
        }
        for (name, value) in &self.values {
            if skip.contains(name) {
                continue;
            }
            builder = builder
                .with_initializer(name, Arc::clone(value))
                .map_err(Error::ort(format!("sharing weight {name}")))?;
        }
        Ok(builder)
    }
}

/// An ONNX Runtime tensor over `data` (`elem` values, row-major, `shape`), without a copy.
///
/// # Safety
/// `data` must stay valid and unchanged for as long as the returned value or any session using it lives.
/// A tensor's bytes in the mapped file, element type and shape.
type Mapped<'f> = (&'f [u8], ort::sys::ONNXTensorElementDataType, Vec<i64>);

/// The bytes of tensors `names`, which must lie one after the other in the file with the same element
/// type and trailing dimensions, as one tensor stacked along the first dimension.
fn span<'f>(file: &'f WeightFile, names: &[String], tensor: &dyn Fn(&str) -> Option<Mapped<'f>>) -> Result<Mapped<'f>> {
    let bad = |msg: String| Error::model(file.path(), format!("fused tensor over {}: {msg}", names.join(", ")));
    let parts =
        names.iter().map(|n| tensor(n).ok_or_else(|| bad(format!("'{n}' is missing")))).collect::<Result<Vec<_>>>()?;
    let (first, elem, shape0) = &parts[0];
    let mut shape = shape0.clone();
    let mut len = first.len();
    for (prev, (data, e, sh)) in parts.iter().zip(&parts[1..]) {
        if prev.0.as_ptr_range().end != data.as_ptr() || e != elem || sh[1..] != shape0[1..] {
            return Err(bad("the members are not adjacent tensors of one layout (re-export the folder)".into()));
        }
        shape[0] += sh[0];
        len += data.len();
    }
    // SAFETY: the members are adjacent slices of the same mapped file (checked above), so the range
    // from the first one's start over `len` bytes is inside that mapping.
    let data = unsafe { std::slice::from_raw_parts(first.as_ptr(), len) };
    Ok((data, *elem, shape))
}

unsafe fn mapped_tensor(
    data: &[u8],
    shape: &[i64],
    elem: ort::sys::ONNXTensorElementDataType,
) -> std::result::Result<DynValue, String> {
    let api = ort::api();
    let info = MemoryInfo::default();
    let mut out: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: valid memory info, pointer and length from a live slice, shape matching its length.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data.as_ptr().cast_mut().cast(),
            data.len(),
            shape.as_ptr(),
            shape.len(),
            elem,
            &mut out,
        )
    };
    if !status.0.is_null() {
        // SAFETY: a non-null status from the API, released once after its message is copied.
        let msg = unsafe { CStr::from_ptr((api.GetErrorMessage)(status.0)) }.to_string_lossy().into_owned();
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(msg);
    }
    let ptr = NonNull::new(out).ok_or("ONNX Runtime returned no tensor")?;
    // SAFETY: a tensor just created by the API, owned by the returned value; its data is not owned by
    // any allocator, so the default CPU allocator is only bookkeeping.
    Ok(unsafe { DynValue::from_ptr(ptr, Some(&Allocator::default())) })
}
