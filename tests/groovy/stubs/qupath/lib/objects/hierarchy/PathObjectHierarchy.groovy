package qupath.lib.objects.hierarchy

import qupath.lib.objects.PathObject
import standin.ImageState

/**
 * STAND-IN for QuPath's PathObjectHierarchy (not QuPath): the 0.4+ methods the panel calls
 * ({@code addObjects}, {@code removeObjects}, {@code getAnnotationObjects},
 * {@code getDetectionObjects}, {@code getSelectionModel}, {@code fireHierarchyChangedEvent}),
 * over the stand-in image's objects.
 */
class PathObjectHierarchy {
    final PathObjectSelectionModel selectionModel = new PathObjectSelectionModel()

    boolean addObjects(Collection<? extends PathObject> pathObjects) {
        int before = ImageState.get().objects.size()
        ImageState.get().add(pathObjects)
        return ImageState.get().objects.size() != before
    }

    void removeObjects(Collection<? extends PathObject> pathObjects, boolean keepChildren) {
        if (!pathObjects.isEmpty())
            ImageState.get().remove(pathObjects)
    }

    Collection<PathObject> getAnnotationObjects() {
        return new ArrayList<PathObject>(ImageState.get().objects.findAll { it.isAnnotation() })
    }

    Collection<PathObject> getDetectionObjects() {
        return new ArrayList<PathObject>(ImageState.get().objects.findAll { it.isDetection() })
    }

    PathObjectSelectionModel getSelectionModel() { return selectionModel }

    /** QuPath: tells the viewers that objects changed. The stand-in saves the record. */
    void fireHierarchyChangedEvent(Object source) { ImageState.get().save() }
}
