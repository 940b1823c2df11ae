/* Types of the fake libax_sys / libax_engine (tests only).
 *
 * The struct layouts are the ones pyaxengine's cffi declarations give for a 64-bit host
 * (AXERA-TECH/pyaxengine 3554448, axengine/_axe_capi.py, the `arch == "64bit"` branch);
 * test_fake_board.py compares every sizeof and field offset below with cffi's, so a
 * layout typed wrong here fails there, not as a wrong answer somewhere else.
 * Names follow the cdef so the two can be read side by side.
 */
#ifndef VLMD_FAKE_AX_H
#define VLMD_FAKE_AX_H

#include <stddef.h>
#include <stdint.h>

typedef int AX_S32;
typedef unsigned int AX_U32;
typedef unsigned long long int AX_U64;
typedef unsigned char AX_U8;
typedef signed char AX_S8;
typedef char AX_CHAR;
typedef void AX_VOID;
typedef AX_U32 AX_ENGINE_NPU_SET_T;

typedef enum { AX_FALSE = 0, AX_TRUE = 1 } AX_BOOL;

typedef enum {
    AX_ENGINE_TENSOR_LAYOUT_UNKNOWN = 0,
    AX_ENGINE_TENSOR_LAYOUT_NHWC = 1,
    AX_ENGINE_TENSOR_LAYOUT_NCHW = 2,
} AX_ENGINE_TENSOR_LAYOUT_T;

typedef enum {
    AX_ENGINE_MT_PHYSICAL = 0,
    AX_ENGINE_MT_VIRTUAL = 1,
    AX_ENGINE_MT_OCM = 2,
} AX_ENGINE_MEMORY_TYPE_T;

/* Data type codes as the cdef numbers them (AX_ENGINE_DT_UNKNOWN = 0, ... BFLOAT16 = 9). */
typedef enum {
    AX_ENGINE_DT_UNKNOWN = 0,
    AX_ENGINE_DT_UINT8 = 1,
    AX_ENGINE_DT_UINT16 = 2,
    AX_ENGINE_DT_FLOAT32 = 3,
    AX_ENGINE_DT_SINT16 = 4,
    AX_ENGINE_DT_SINT8 = 5,
    AX_ENGINE_DT_SINT32 = 6,
    AX_ENGINE_DT_UINT32 = 7,
    AX_ENGINE_DT_FLOAT64 = 8,
    AX_ENGINE_DT_BFLOAT16 = 9,
} AX_ENGINE_DATA_TYPE_T;

typedef enum { AX_ENGINE_CS_FEATUREMAP = 0 } AX_ENGINE_COLOR_SPACE_T;

/* The cdef declares only VIRTUAL_NPU_DISABLE; pyaxengine's VNPUType enum (_axe_types.py)
 * gives the other values: ENABLED 1, BIG_LITTLE 2, LITTLE_BIG 3. */
typedef enum { AX_ENGINE_VIRTUAL_NPU_DISABLE = 0 } AX_ENGINE_NPU_MODE_T;
typedef enum { AX_ENGINE_MODEL_TYPE0 = 0 } AX_ENGINE_MODEL_TYPE_T;

typedef struct {
    AX_ENGINE_NPU_MODE_T eHardMode;
    AX_U32 reserve[8];
} AX_ENGINE_NPU_ATTR_T;

typedef struct _AX_ENGINE_IO_META_EX_T {
    AX_ENGINE_COLOR_SPACE_T eColorSpace;
    AX_U64 u64Reserved[18];
} AX_ENGINE_IO_META_EX_T;

typedef struct {
    AX_ENGINE_NPU_SET_T nNpuSet;
    AX_S8 *pName;
    AX_U32 reserve[8];
} AX_ENGINE_HANDLE_EXTRA_T;

typedef struct _AX_ENGINE_CMM_INFO_T {
    AX_U32 nCMMSize;
} AX_ENGINE_CMM_INFO_T;

typedef struct _AX_ENGINE_IO_SETTING_T {
    AX_U32 nWbtIndex;
    AX_U64 u64Reserved[7];
} AX_ENGINE_IO_SETTING_T;

typedef struct _AX_ENGINE_IO_META_T {
    AX_CHAR *pName;
    AX_S32 *pShape;
    AX_U8 nShapeSize;
    AX_ENGINE_TENSOR_LAYOUT_T eLayout;
    AX_ENGINE_MEMORY_TYPE_T eMemoryType;
    AX_ENGINE_DATA_TYPE_T eDataType;
    AX_ENGINE_IO_META_EX_T *pExtraMeta;
    AX_U32 nSize;
    AX_U32 nQuantizationValue;
    AX_S32 *pStride;
    AX_U64 u64Reserved[9];
} AX_ENGINE_IO_META_T;

typedef struct _AX_ENGINE_IO_INFO_T {
    AX_ENGINE_IO_META_T *pInputs;
    AX_U32 nInputSize;
    AX_ENGINE_IO_META_T *pOutputs;
    AX_U32 nOutputSize;
    AX_U32 nMaxBatchSize;
    AX_BOOL bDynamicBatchSize;
    AX_U64 u64Reserved[11];
} AX_ENGINE_IO_INFO_T;

typedef struct _AX_ENGINE_IO_BUFFER_T {
    AX_U64 phyAddr;
    AX_VOID *pVirAddr;
    AX_U32 nSize;
    AX_S32 *pStride;
    AX_U8 nStrideSize;
    AX_U64 u64Reserved[11];
} AX_ENGINE_IO_BUFFER_T;

typedef struct _AX_ENGINE_IO_T {
    AX_ENGINE_IO_BUFFER_T *pInputs;
    AX_U32 nInputSize;
    AX_ENGINE_IO_BUFFER_T *pOutputs;
    AX_U32 nOutputSize;
    AX_U32 nBatchSize;
    AX_ENGINE_IO_SETTING_T *pIoSetting;
    AX_U64 u64Reserved[10];
} AX_ENGINE_IO_T;

/* What libax_engine asks of the fake CMM (exported by libax_sys.so, not part of AXERA's API):
 * the device copy of `nbytes` bytes at physical address `phys`, NULL when they are not all
 * inside one allocated block. */
AX_VOID *FAKE_SYS_Device(AX_U64 phys, AX_U64 nbytes);

#endif
