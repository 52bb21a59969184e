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
    pub fn new(file: Arc<WeightFile>, blended: &HashSet<String>, embedding: &str) -> Result<SharedWeights> {
        use ort::sys::ONNXTensorElementDataType as T;
        let mut values = HashMap::new();
        let mut bytes = 0;
        for name in file.names() {
            let Some(info) = file.info(name) else { continue };
            let (data, elem) = match (file.f32_bytes(name), file.u8_bytes(name)) {
                (Some(d), _) => (d, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                (None, Some(d)) => (d, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
                _ => continue,
            };
            let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            // SAFETY: `data` lies in `file`'s read-only mapping, which this struct keeps alive for as
            // long as any session may use the tensor (see `values`); ONNX Runtime never writes to
            // initializers; `elem` is the element type `data` is stored as.
            let value = unsafe { mapped_tensor(data, &shape, elem) }
                .map_err(|msg| Error::Ort { context: format!("sharing weight {name}"), msg })?;
            bytes += data.len();
            values.insert(name.to_string(), Arc::new(value));
        }
        // Matrices ONNX Runtime pre-packs: float32 2-D weights (Gemm) other than the looked-up
        // embedding, and the u8 blocks of MatMulNBits (4-bit matrices, the 8-bit tied LM head).
        let untouched_matrix = |name: &&str| {
            !blended.contains(*name)
                && *name != embedding
                && file.info(name).is_some_and(|i| i.shape.len() == 2 || file.u8_bytes(name).is_some())
        };
        let share_packed = !blended.is_empty() && file.names().any(|n| untouched_matrix(&n));
        tracing::info!(mapped_mb = bytes >> 20, share_packed, "model weights shared across sessions");
        let prepacked = share_packed.then(PrepackedWeights::new);
        let tied_head_bytes = match file.info(LM_HEAD) {
            Some(_) => 0,
            None => file.f32_bytes(embedding).map_or(0, <[u8]>::len),
        };
        Ok(SharedWeights { values, prepacked, tied_head_bytes, _file: file })
    }

    /// Bytes of the embedding table when the LM head is tied to it (no `lm_head.weight`): each session
    /// then holds its own transposed copy, folded at build time.
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
